"""One folder of every kind of hostile input next to good X-rays, through every command and the server.

The per-kind tests (tests/data/test_hostile.py, tests/data/test_acquisition.py, ...) pin each reason;
this one checks the promise as a whole, the way a careful tester tries it: every command finishes within
60 s, says one line per bad file naming it, gives the good files the results they get alone, and the
server answers each bad upload with a 4xx JSON error.
"""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxrnn.data.io import reference_radiograph

LIMIT_S = 60


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _dicom(tmp: Path, name: str, **changes) -> Path:
    import pydicom

    ds = pydicom.dcmread(reference_radiograph("RG1_UNCR.dcm"))
    for key, value in changes.items():
        if value is None:
            delattr(ds, key)
        else:
            setattr(ds, key, value)
    path = tmp / name
    ds.save_as(path)
    return path


def hostile_files(folder: Path) -> list[Path]:
    """Files of the kinds issue 13 names, made differently from the per-kind tests."""
    folder.mkdir()
    made = []

    fifo = folder / "pipe.png"
    os.mkfifo(fifo)
    made.append(fifo)
    zero = folder / "zero.dcm"
    zero.symlink_to("/dev/urandom")  # endless like /dev/zero, but never looks blank
    made.append(zero)

    side = 7000  # explained in bounded memory; a 100 KB file
    row = ((np.sin(np.arange(side, dtype=np.float32) / 300) + 1) * 120).astype(np.uint8)
    Image.fromarray(np.broadcast_to(row, (side, side)).copy()).save(folder / "huge.png", optimize=True)

    bomb = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 30000, 20000, 8, 0, 0, 0, 0))
    (folder / "bomb.png").write_bytes(bomb + _png_chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + _png_chunk(b"IEND", b""))
    made.append(folder / "bomb.png")

    grey = (np.add.outer(np.arange(64), np.arange(64)) * 2).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(grey).save(buf, format="JPEG")
    (folder / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    made.append(folder / "cut.jpg")
    Image.new("L", (300, 300), 255).save(folder / "white.bmp")
    made.append(folder / "white.bmp")
    Image.new("LA", (200, 200), (90, 0)).save(folder / "clear.png")
    made.append(folder / "clear.png")
    (folder / "notes.png").write_text("this is not an image\n")
    made.append(folder / "notes.png")
    (folder / "empty.dcm").write_bytes(b"")
    made.append(folder / "empty.dcm")
    (folder / "noise.jpg").write_bytes(b"\xff\xd8\xff\xe0" + np.random.default_rng(5).bytes(5000))
    made.append(folder / "noise.jpg")

    made.append(_dicom(folder, "ct.dcm", Modality="CT"))
    made.append(_dicom(folder, "knee.dcm", BodyPartExamined="KNEE"))
    made.append(_dicom(folder, "palette.dcm", PhotometricInterpretation="PALETTE COLOR"))
    made.append(_dicom(folder, "nopixels.dcm", PixelData=None))
    made.append(_dicom(folder, "slope.dcm", RescaleSlope="1e308", RescaleIntercept="1e308"))
    with open(folder / "newline\nname.png", "wb") as fh:  # a name that would break a line-per-file output
        fh.write(b"\x89PNG\r\n\x1a\n garbage")
    made.append(folder / "newline\nname.png")
    return made


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, phantom_dir):
    root = tmp_path_factory.mktemp("corpus")
    bad = hostile_files(root / "bad")
    good = sorted((phantom_dir / "covid").glob("*.png"))[:2] + [reference_radiograph("RG1_UNCR.dcm")]
    return bad, good, root / "bad" / "huge.png"


def cxrnn(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cxrnn", *args], capture_output=True, text=True, timeout=LIMIT_S)


def test_predict_answers_in_time_with_one_line_per_bad_file(trained_run, corpus):
    bad, good, huge = corpus
    model = str(trained_run.model_path)
    alone = {(line := json.loads(text))["path"]: line
             for text in cxrnn("predict", model, *map(str, good), "--json").stdout.splitlines()}

    result = cxrnn("predict", model, *map(str, good + bad + [huge]), "--json")
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]  # one per file (in sorted path order)
    assert len(lines) == len(good) + len(bad) + 1
    by_path = {line["path"]: line for line in lines}
    assert {str(p): by_path[str(p)] for p in good} == alone  # the good files' results are untouched by the bad ones
    for path in bad:
        line = by_path[str(path)]
        assert set(line) == {"path", "error"}, line
        # JSON escapes a newline in the name; the reason after the name is one line
        assert line["error"].startswith(f"{path}: ") and "\n" not in line["error"][len(str(path)):]
    assert "error" not in by_path[str(huge)]  # a huge but valid image is predicted

    text = cxrnn("predict", model, *map(str, bad))
    assert text.returncode == 1  # nothing readable: a failure, and said so
    skipped = [line for line in text.stderr.splitlines() if line.startswith("warning: skipped ")]
    assert len(skipped) == len(bad) and text.stdout == ""  # one line per bad file, a newline in a name escaped
    assert text.stderr.splitlines()[-1] == f"error: none of the {len(bad)} file(s) could be read"


def test_explain_answers_in_time_and_writes_the_good_files_maps(trained_run, corpus, tmp_path):
    bad, good, huge = corpus
    out = tmp_path / "maps"
    result = cxrnn("explain", str(trained_run.model_path), *map(str, good + bad + [huge]), "--out", str(out))
    assert result.returncode == 0, result.stderr
    index = json.loads((out / "explanations.json").read_text())
    assert index["n"] == len(good) + 1 and index["errors"] == len(bad)
    errors = [entry for entry in index["images"] if "error" in entry]
    assert sorted(e["path"] for e in errors) == sorted(str(p) for p in bad)
    assert all(e["error"].startswith(f"{e['path']}: ") and "\n" not in e["error"][len(e["path"]):] for e in errors)
    (huge_entry,) = [e for e in index["images"] if e["path"] == str(huge)]
    assert huge_entry["image_size"] == [7000, 7000] and huge_entry["map_size"][0] <= 4096


def test_server_answers_every_bad_upload_with_a_4xx_json_error(trained_run, corpus):
    from fastapi.testclient import TestClient

    from cxrnn.serve.app import create_app

    bad, good, _ = corpus
    uploads = [p for p in bad if p.is_file() and not p.is_symlink()]  # a client sends bytes, not pipes
    with TestClient(create_app(trained_run.model_path, timeout_s=LIMIT_S)) as client:
        for path in uploads:
            for route in ("/v1/predict", "/v1/explain"):
                r = client.post(route, files={"file": ("upload", path.read_bytes())})
                assert 400 <= r.status_code < 500, (path.name, route, r.status_code, r.text[:200])
                assert set(r.json()) == {"error"} and r.json()["error"], (path.name, r.text)
        r = client.post("/v1/predict", files={"file": ("x.dcm", good[-1].read_bytes())})
        assert r.status_code == 200 and r.json()["label"]
