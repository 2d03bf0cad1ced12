"""A run directory is the old run, whole, or the new run, whole; bad --out and too-small datasets are refused early."""

from __future__ import annotations

import errno
import os
import re
import shutil
from pathlib import Path

import pytest

import cxrnn.training.pipeline as pipeline
from cxrnn.data.phantom import PhantomConfig, generate_phantom
from cxrnn.models.bundle import load_bundle
from cxrnn.training import TrainConfig, train


def tiny(data: Path, out: Path, cache: Path, **kw) -> TrainConfig:
    values = dict(data=str(data), out=str(out), backbone="test_efficientnet", weights="none", head="pool", epochs=1,
                  batch_size=8, bootstrap=0, cache_dir=str(cache), extract_runtime="torch")
    return TrainConfig(**{**values, **kw})


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    generate_phantom(root, PhantomConfig(per_class=8, size=64, seed=61))
    return root


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def old_run(data, cache, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("old") / "run"
    train(tiny(data, out, cache, seed=0))
    return out


@pytest.fixture
def run(old_run, tmp_path) -> Path:
    """A copy of a finished run in a folder of its own (so leftovers beside it can be seen)."""
    out = tmp_path / "runs" / "run"
    shutil.copytree(old_run, out)
    return out


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_untouched(run: Path, before: dict[str, bytes]) -> None:
    assert snapshot(run) == before
    assert sorted(p.name for p in run.parent.iterdir()) == [run.name]  # no temporary sibling left behind


def _raise(exc: BaseException):
    def fit(*args, **kwargs):
        raise exc
    return fit


def test_a_missing_dataset_leaves_the_old_run_whole(run, data, cache) -> None:
    before = snapshot(run)
    assert {"config.yaml", "model.pt", "metrics.json", "report.md"} <= set(before)
    with pytest.raises((ValueError, FileNotFoundError), match="does_not_exist"):
        train(tiny(run.parent / "does_not_exist", run, cache))
    assert_untouched(run, before)


@pytest.mark.parametrize("exc", [RuntimeError("fit failed"), KeyboardInterrupt()])
def test_a_failure_or_interrupt_during_fitting_leaves_the_old_run_whole(run, data, cache, monkeypatch, exc) -> None:
    before = snapshot(run)
    monkeypatch.setattr(pipeline, "fit_frozen", _raise(exc))
    with pytest.raises(type(exc)):
        train(tiny(data, run, cache, seed=5, epochs=2))
    assert_untouched(run, before)


def test_an_interrupt_while_writing_the_run_leaves_the_old_run_whole(run, data, cache, monkeypatch) -> None:
    before = snapshot(run)
    real = pipeline.finish_run
    seen = []

    def finish_then_interrupt(cfg, tmp, *args):
        real(cfg, tmp, *args)
        seen.append(sorted(p.name for p in tmp.iterdir()))
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "finish_run", finish_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        train(tiny(data, run, cache, seed=5))
    assert "model.pt" in seen[0]  # the new run was fully written, in a sibling, and then thrown away
    assert_untouched(run, before)


def test_a_failed_swap_puts_the_old_run_back(run, data, cache, monkeypatch) -> None:
    before = snapshot(run)
    calls = []
    rename = os.rename

    def second_rename_fails(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise OSError(errno.EIO, "Input/output error")
        rename(src, dst)

    monkeypatch.setattr(pipeline.os, "rename", second_rename_fails)
    with pytest.raises(OSError):
        train(tiny(data, run, cache, seed=5))
    assert_untouched(run, before)


def test_a_failed_run_into_a_new_out_leaves_nothing(data, cache, tmp_path, monkeypatch) -> None:
    out = tmp_path / "new" / "deeper" / "run"
    with pytest.raises((ValueError, FileNotFoundError)):
        train(tiny(tmp_path / "does_not_exist", out, cache))
    monkeypatch.setattr(pipeline, "finish_run", _raise(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        train(tiny(data, out, cache))
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # neither the run nor the parents made for it


def test_a_new_run_replaces_the_old_one_whole(run, data, cache) -> None:
    (run / "stale.txt").write_text("from the old run")
    old_config = (run / "config.yaml").read_text()
    result = train(tiny(data, run, cache, seed=3))
    assert result.run_dir == run and result.model_path == run / "model.pt"
    assert not (run / "stale.txt").exists()
    assert (run / "config.yaml").read_text() != old_config and "seed: 3" in (run / "config.yaml").read_text()
    assert load_bundle(result.model_path).config["seed"] == 3
    report = (run / "report.md").read_text()
    for image in re.findall(r"\]\(([^)]+\.png)\)", report):
        assert (run / image).is_file(), image
    assert sorted(p.name for p in run.parent.iterdir()) == [run.name]
    assert oct(run.stat().st_mode & 0o777) == oct(0o777 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _no_work(monkeypatch) -> None:
    monkeypatch.setattr(pipeline, "load_dataset", _raise(AssertionError("work started before --out was checked")))


def test_an_out_that_is_a_file_is_refused_before_any_work(data, cache, tmp_path, monkeypatch) -> None:
    _no_work(monkeypatch)
    out = tmp_path / "run"
    out.write_text("not a folder")
    with pytest.raises(ValueError, match=f"^--out {re.escape(str(out))}: exists and is not a folder$"):
        train(tiny(data, out, cache))
    assert out.read_text() == "not a folder"
    inside = tmp_path / "run" / "sub"
    with pytest.raises(ValueError, match="is not a folder"):
        train(tiny(data, inside, cache))


def test_an_out_on_a_read_only_file_system_is_refused_before_any_work(data, cache, tmp_path, monkeypatch) -> None:
    _no_work(monkeypatch)
    mkdir = Path.mkdir

    def read_only(self, *args, **kwargs):
        if self.name.startswith(".cxrnn-probe-"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only)
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=f"^--out {re.escape(str(out))}: cannot write in .*Read-only file system"):
        train(tiny(data, out, cache))
    assert not out.exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_an_out_in_a_folder_without_write_permission_is_refused(data, cache, tmp_path, monkeypatch) -> None:
    _no_work(monkeypatch)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        with pytest.raises(ValueError, match="cannot write in .*Permission denied"):
            train(tiny(data, locked / "run", cache))
    finally:
        locked.chmod(0o755)


def test_a_folder_that_is_not_a_run_is_never_replaced(data, cache, tmp_path, monkeypatch) -> None:
    _no_work(monkeypatch)
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "thesis.tex").write_text("precious")
    with pytest.raises(ValueError, match="holding files that are not a cxrnn run .*thesis.tex"):
        train(tiny(data, folder, cache))
    assert (folder / "thesis.tex").read_text() == "precious"
    monkeypatch.chdir(folder)
    with pytest.raises(ValueError, match="is the current folder or holds it"):
        train(tiny(data, tmp_path, cache))
    with pytest.raises(ValueError, match="--cache-dir .* is inside --out"):
        train(tiny(data, tmp_path / "run", tmp_path / "run" / "cache"))


def _classes(root: Path, counts: dict[str, int], data: Path) -> Path:
    for name, n in counts.items():
        (root / name).mkdir(parents=True)
        for path in sorted((data / name).iterdir())[:n]:
            shutil.copy(path, root / name / path.name)
    return root


def test_a_single_class_is_refused_before_fitting(data, cache, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(pipeline, "fit_frozen", _raise(AssertionError("fitted a single class")))
    one = _classes(tmp_path / "one", {"covid": 8}, data)
    with pytest.raises(ValueError, match="training needs images of at least two classes, found covid 8"):
        train(tiny(one, tmp_path / "run", cache))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("kw, minimum, rule", [
    ({}, 5, r"ceil\(1 / test_size 0.2\) = 5 for one in the test split"),
    ({"test_size": 0.5}, 4, r"ceil\(2 / \(1 - test_size\)\) = 4 so that the rest holds one for training and one for validation"),
    ({"test_size": 0.5, "val_size": 0.0}, 2, None),
    ({"folds": 4}, 5, r"ceil\(4 / \(1 - test_size\)\) = 5 so that the rest holds one for each of the 4 folds"),
])
def test_too_few_images_per_class_for_the_split_are_refused(data, cache, tmp_path, monkeypatch, kw, minimum, rule
                                                             ) -> None:
    monkeypatch.setattr(pipeline, "fit_frozen", _raise(AssertionError("fitted too small a dataset")))
    few = _classes(tmp_path / "few", {"covid": minimum - 1, "normal": 8}, data)
    message = f"too few images per class for the split asked: covid {minimum - 1}; every class needs at least {minimum}"
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        train(tiny(few, tmp_path / "run", cache, **kw))
    if rule:
        assert re.search(rule, str(info.value))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("kw", [{}, {"test_size": 0.5}, {"test_size": 0.3, "val_size": 0.25}, {"test_size": 0.5, "val_size": 0.0}])
def test_the_minimum_per_class_gives_every_split_one_of_each(kw) -> None:
    import numpy as np

    from cxrnn.data.splits import train_val_test_split
    from cxrnn.training.run import check_class_counts, min_images_per_class

    cfg = TrainConfig(**kw)
    minimum, _ = min_images_per_class(cfg)
    check_class_counts({"covid": minimum, "normal": minimum, "pneumonia": minimum}, cfg)  # no error
    # balanced classes: the hold-out takes at least one image per class, so the minimum is enough
    labels = np.repeat([0, 1, 2], minimum)
    for seed in range(5):
        split = train_val_test_split(labels, cfg.test_size, cfg.val_size, seed)
        parts = [split.train, split.test] + ([split.val] if cfg.val_size else [])
        assert all(set(labels[part]) == {0, 1, 2} for part in parts), (kw, seed)
