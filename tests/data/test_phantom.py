"""Behavioural tests of the synthetic chest X-ray phantom (small sizes so they run in seconds)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.ndimage import binary_dilation

from cxrnn.data.phantom import (
    CLASSES,
    PhantomConfig,
    case_seed_for,
    generate_phantom,
    load_phantom_config,
    render_case,
)

BASE_COLUMNS = ["path", "label", "patient_id", "source", "mask", "lung_mask", "case_seed"]


def _read_manifest(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames or []), list(reader)


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small_set(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, PhantomConfig]:
    cfg = PhantomConfig(per_class=6, size=96, seed=3)
    out = tmp_path_factory.mktemp("phantom")
    calls: list[tuple[int, int]] = []
    manifest = generate_phantom(out, cfg, progress=lambda d, t: calls.append((d, t)))
    assert manifest == out / "manifest.csv"
    assert calls and calls[-1] == (18, 18)
    return out, cfg


def test_files_and_manifest_agree(small_set: tuple[Path, PhantomConfig]) -> None:
    out, cfg = small_set
    cols, rows = _read_manifest(out / "manifest.csv")
    assert cols == BASE_COLUMNS
    assert len(rows) == 3 * cfg.per_class
    assert sorted({r["label"] for r in rows}) == sorted(CLASSES)
    listed = set()
    for r in rows:
        assert "\\" not in r["path"] and r["path"].startswith(f"{r['label']}/")
        img = Image.open(out / r["path"])
        assert img.mode == "L" and img.size == (cfg.size, cfg.size)
        listed.add(r["path"])
        assert r["patient_id"].startswith("P") and len(r["patient_id"]) == 6
        assert r["source"] == "hospital_0"
        assert int(r["case_seed"]) == case_seed_for(cfg.seed, r["label"], int(Path(r["path"]).stem.split("_")[1]))
        lungs = np.array(Image.open(out / r["lung_mask"]))
        assert set(np.unique(lungs)) <= {0, 255} and lungs.any()
        if r["label"] == "normal":
            assert r["mask"] == ""
        else:
            lesion = np.array(Image.open(out / r["mask"]))
            assert set(np.unique(lesion)) <= {0, 255} and lesion.any()
            # The lesion mask lies inside the lungs.
            assert not (lesion.astype(bool) & ~lungs.astype(bool)).any()
    # One image per patient; every PNG on disk is listed.
    assert len({r["patient_id"] for r in rows}) == len(rows)
    on_disk = {p.relative_to(out).as_posix() for c in CLASSES for p in (out / c).glob("*.png")}
    assert on_disk == listed
    # Masks exist for abnormal images only; lung masks for all.
    masks = {p.name for p in (out / "masks").glob("*.png")}
    for r in rows:
        stem = Path(r["path"]).stem
        assert f"{stem}_lungs.png" in masks
        assert (f"{stem}_lesion.png" in masks) == (r["label"] != "normal")
    # No temp files left behind by the atomic writes.
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


def test_phantom_json_rerenders_cases(small_set: tuple[Path, PhantomConfig]) -> None:
    out, cfg = small_set
    meta = json.loads((out / "phantom.json").read_text())
    assert meta["classes"] == list(CLASSES) and "version" in meta
    cfg2 = load_phantom_config(out)
    assert cfg2 == cfg
    _, rows = _read_manifest(out / "manifest.csv")
    for r in rows[:: len(rows) // 4]:
        case = render_case(int(r["case_seed"]), r["label"], cfg2, source=int(r["source"].split("_")[1]))
        on_disk = np.array(Image.open(out / r["path"]))
        assert np.array_equal(np.round(case.image * 255).astype(np.uint8), on_disk)


def test_deterministic_and_seed_dependent(tmp_path: Path, small_set: tuple[Path, PhantomConfig]) -> None:
    out, cfg = small_set
    again = generate_phantom(tmp_path / "again", cfg, workers=2).parent
    assert _tree_bytes(again) == _tree_bytes(out)  # also independent of the worker count
    other = PhantomConfig(per_class=cfg.per_class, size=cfg.size, seed=cfg.seed + 1)
    a = render_case(case_seed_for(cfg.seed, "normal", 0), "normal", cfg).image
    b = render_case(case_seed_for(other.seed, "normal", 0), "normal", other).image
    assert not np.array_equal(a, b)
    different = generate_phantom(tmp_path / "other", other).parent
    assert (different / "normal/normal_0000.png").read_bytes() != (out / "normal/normal_0000.png").read_bytes()


def test_image_range_and_anatomy() -> None:
    cfg = PhantomConfig(size=128)
    lung_means, central_means = [], []
    for i in range(6):
        seed = case_seed_for(0, "normal", i)
        case = render_case(seed, "normal", cfg)
        img = case.image
        assert img.dtype == np.float32 and img.shape == (128, 128)
        assert 0.0 <= img.min() and img.max() <= 1.0
        assert case.marker_box is None and not case.lesion_mask.any()
        # Lungs: two separate fields, one on each side of the midline.
        lm = case.lung_mask
        assert 0.1 < lm.mean() < 0.45
        assert lm[:, :60].any() and lm[:, 68:].any() and not lm[:, 63:65].any()
        # Lungs are dark, the mediastinum / spine strip bright.
        lung_means.append(img[lm].mean())
        central_means.append(img[20:90, 60:68].mean())
        # Air outside the body, at the left/right edges mid-height, is darker than lungs.
        assert img[60:70, :3].mean() < img[lm].mean()
    assert np.mean(lung_means) + 0.15 < np.mean(central_means)


def test_lesion_false_is_the_same_image_without_lesion() -> None:
    cfg = PhantomConfig(size=128, difficulty=0.7)
    for label in ("covid", "pneumonia"):
        for i in range(3):
            seed = case_seed_for(0, label, i)
            with_l = render_case(seed, label, cfg)
            without = render_case(seed, label, cfg, lesion=False)
            assert with_l.lesion_mask.any() and not without.lesion_mask.any()
            assert np.array_equal(with_l.lung_mask, without.lung_mask)
            assert with_l.marker_box == without.marker_box
            # Identical away from the (slightly blurred) lesion ...
            diff = np.abs(with_l.image - without.image)
            grown = binary_dilation(with_l.lesion_mask, iterations=12)
            # Only the faint, sub-threshold lesion margin (and any part hidden behind the heart).
            assert diff[~grown].mean() < 0.003 and diff[~grown].max() < 0.15
            far = ~binary_dilation(with_l.lesion_mask, structure=np.ones((3, 3), bool), iterations=24)
            assert far.mean() > 0.3 and np.array_equal(with_l.image[far], without.image[far])
            # ... and brighter inside it.
            m = with_l.lesion_mask
            assert with_l.image[m].mean() > without.image[m].mean() + 0.02


def test_lesion_laterality() -> None:
    cfg = PhantomConfig(size=128)
    mid = 64
    for i in range(8):
        pn = render_case(case_seed_for(0, "pneumonia", i), "pneumonia", cfg)
        left, right = pn.lesion_mask[:, :mid].sum(), pn.lesion_mask[:, mid:].sum()
        assert (left > 0) != (right > 0), "pneumonia must be a single consolidation in one lung"
        cv = render_case(case_seed_for(0, "covid", i), "covid", cfg)
        assert cv.lesion_mask[:, :mid].any() and cv.lesion_mask[:, mid:].any(), "covid must be bilateral"
        assert not (cv.lesion_mask & ~cv.lung_mask).any()


def test_covid_is_peripheral_and_fainter_than_pneumonia() -> None:
    cfg = PhantomConfig(size=128)
    cov_gain, pn_gain, periph = [], [], []
    for i in range(8):
        cv_seed, pn_seed = case_seed_for(0, "covid", i), case_seed_for(0, "pneumonia", i)
        cv, cv0 = render_case(cv_seed, "covid", cfg), render_case(cv_seed, "covid", cfg, lesion=False)
        pn, pn0 = render_case(pn_seed, "pneumonia", cfg), render_case(pn_seed, "pneumonia", cfg, lesion=False)
        cov_gain.append((cv.image - cv0.image)[cv.lesion_mask].mean())
        pn_gain.append((pn.image - pn0.image)[pn.lesion_mask].mean())
        # Peripheral: lesion pixels lie further from the midline than the average lung pixel.
        xs = np.abs(np.nonzero(cv.lesion_mask)[1] - 63.5).mean()
        xl = np.abs(np.nonzero(cv.lung_mask)[1] - 63.5).mean()
        periph.append(xs > xl)
    assert np.mean(pn_gain) > np.mean(cov_gain) > 0
    assert np.mean(periph) >= 0.75


def test_difficulty_scales_lesion_contrast() -> None:
    seed = case_seed_for(0, "pneumonia", 1)
    gains = []
    for d in (0.5, 1.0, 2.0):
        cfg = PhantomConfig(size=96, difficulty=d)
        a, b = render_case(seed, "pneumonia", cfg), render_case(seed, "pneumonia", cfg, lesion=False)
        gains.append(float((a.image - b.image).sum()))
    assert gains[0] > gains[1] > gains[2] > 0


def test_shortcut_marker_correlates_with_class(tmp_path: Path) -> None:
    cfg = PhantomConfig(per_class=10, size=64, seed=1, shortcut=True, shortcut_strength=0.9)
    cols, rows = _read_manifest(generate_phantom(tmp_path, cfg))
    assert cols == BASE_COLUMNS + ["marker"]
    rate = {c: np.mean([r["marker"] == "1" for r in rows if r["label"] == c]) for c in CLASSES}
    assert rate["covid"] >= 0.6 and rate["pneumonia"] >= 0.6 and rate["normal"] <= 0.4
    for r in rows[:6]:
        case = render_case(int(r["case_seed"]), r["label"], cfg)
        assert (case.marker_box is not None) == (r["marker"] == "1")
        if case.marker_box is not None:
            y0, x0, y1, x1 = case.marker_box
            assert case.image[y0:y1, x0:x1].max() == 1.0
            assert not case.lung_mask[y0:y1, x0:x1].any()  # outside the lungs
            assert not case.lesion_mask[y0:y1, x0:x1].any()
    # Strength 1.0 makes the marker a perfect label predictor; plain phantom has none.
    perfect = PhantomConfig(size=64, shortcut=True, shortcut_strength=1.0)
    for c in CLASSES:
        has = render_case(case_seed_for(0, c, 0), c, perfect).marker_box is not None
        assert has == (c != "normal")
    assert render_case(case_seed_for(0, "covid", 0), "covid", PhantomConfig(size=64)).marker_box is None


def test_sources_are_recorded_and_styled(tmp_path: Path) -> None:
    cfg = PhantomConfig(per_class=10, size=64, seed=2, sources=3)
    cols, rows = _read_manifest(generate_phantom(tmp_path, cfg))
    assert cols == BASE_COLUMNS
    assert {r["source"] for r in rows} == {"hospital_0", "hospital_1", "hospital_2"}
    # Same patient rendered at two hospitals: different acquisition style.
    seed = case_seed_for(2, "normal", 0)
    a = render_case(seed, "normal", cfg, source=0).image
    b = render_case(seed, "normal", cfg, source=1).image
    assert np.abs(a - b).mean() > 0.005


def test_unknown_label_rejected() -> None:
    with pytest.raises(ValueError):
        render_case(0, "tuberculosis", PhantomConfig(size=64))
