import os
import stat

import pytest

from cxrnn.utils.atomic import atomic_write, atomic_write_bytes, atomic_write_json


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp_file(tmp_path):
    target = atomic_write_bytes(tmp_path / "metrics.json", b"old run")

    def half_then_fail(fh):
        fh.write(b"new ru")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        atomic_write(target, half_then_fail)
    assert target.read_bytes() == b"old run"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_written_files_get_the_mode_open_would_give_not_mkstemps_0600(tmp_path):
    umask = os.umask(0o022)
    os.umask(umask)
    path = atomic_write_json(tmp_path / "sub" / "a.json", {"x": 1})
    plain = tmp_path / "plain"
    plain.write_text("x")
    assert stat.S_IMODE(path.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode) == 0o666 & ~umask
    assert path.read_text() == '{\n  "x": 1\n}'
