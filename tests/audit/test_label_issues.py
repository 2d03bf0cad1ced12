"""The audit's suspected-label-error check: out-of-fold probe on cached backbone features + cleanlab."""

import csv
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from cxrnn.audit import run_audit
from cxrnn.audit.label_issues import GRID_NAME, find_suspects

CLASSES = ["covid", "normal", "pneumonia"]


def _relabel(phantom_dir, root):
    """A copy of the session phantom whose manifest gives 6 images (2 per class) the next class's label."""
    shutil.copytree(phantom_dir, root)
    with open(root / "manifest.csv", newline="") as fh:
        header, *rows = list(csv.reader(fh))
    wrong = []
    for c, name in enumerate(CLASSES):
        for k in (8, 9):
            row = [r for r in rows if r[1] == name][k]
            row[1] = CLASSES[(c + 1) % 3]
            wrong.append(str(root / row[0]))
    with open(root / "manifest.csv", "w", newline="") as fh:
        csv.writer(fh, lineterminator="\n").writerows([header, *rows])
    return wrong


def test_six_wrong_labels_rank_among_the_top_suspects(phantom_dir, cache_dir, tmp_path):
    wrong = _relabel(phantom_dir, tmp_path / "data")
    run_audit(tmp_path / "data", tmp_path / "out", cache_dir=cache_dir)
    saved = json.loads((tmp_path / "out" / "audit.json").read_text())
    found = saved["label_issues"]
    suspects = found["suspects"]
    assert [s["rank"] for s in suspects] == list(range(1, len(suspects) + 1)) and len(suspects) == 50
    scores = [s["score"] for s in suspects]
    assert scores == sorted(scores)
    top12 = {s["path"] for s in suspects[:12]}
    assert len(top12 & set(wrong)) >= 4, [(s["rank"], s["path"]) for s in suspects if s["path"] in wrong]
    for s in suspects:
        assert set(s) >= {"path", "given", "suggested", "score", "flagged_by_cleanlab"}
        assert s["given"] in CLASSES and s["suggested"] in CLASSES and 0 <= s["score"] <= 1
    # a wrong label found is mostly put back: the suggestion is the class the image was drawn from
    back = [s for s in suspects[:12] if s["path"] in wrong]
    assert sum(s["path"].split("/")[-2] == s["suggested"] for s in back) >= len(back) - 1

    check = saved["checks"]["label_issues"]
    assert check["status"] in ("ok", "warning", "fail") and check["value"] == pytest.approx(found["flagged_share"])
    assert found["n_flagged"] >= sum(s["flagged_by_cleanlab"] for s in suspects) > 0
    assert found["n"] == 120 and found["folds"] == 5

    md = (tmp_path / "out" / "audit.md").read_text()
    assert "## Suspected label errors" in md and f"]({GRID_NAME})" in md
    with Image.open(tmp_path / "out" / GRID_NAME) as grid:
        grid.verify()
    with Image.open(tmp_path / "out" / GRID_NAME) as grid:
        assert grid.format == "PNG" and grid.width >= 400 and grid.height >= 400


def test_clean_phantom_is_not_a_fail(phantom_dir, cache_dir, tmp_path):
    result = run_audit(phantom_dir, tmp_path / "out", cache_dir=cache_dir)
    check = result["checks"]["label_issues"]
    assert check["status"] in ("ok", "warning"), check
    assert 0 <= check["value"] < 0.15


def test_small_classes_use_fewer_folds_or_skip():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(13, 8))
    y = np.array([0] * 5 + [1] * 5 + [2] * 3)
    x[y == 1] += 3
    paths = [f"img{i}.png" for i in range(13)]
    found = find_suspects(x, y, np.arange(13), CLASSES, paths)
    assert found["folds"] == 3 and len(found["suspects"]) == 13
    one = find_suspects(x[:11], y[:11], np.arange(11), CLASSES, paths[:11])
    assert "reason" in one and "1 readable image" in one["reason"]
    assert "reason" in find_suspects(x[:5], y[:5], np.arange(5), CLASSES, paths[:5])
