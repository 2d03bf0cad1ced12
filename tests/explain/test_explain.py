"""Maps through the CNN->RNN (the default method and Grad-CAM): map geometry, hooks and memory, bad files,
DICOM, ground truth and faithfulness on the phantom."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cxrnn.cli import app
from cxrnn.data.dataset import load_dataset
from cxrnn.data.io import read_image, reference_radiograph
from cxrnn.explain import CamExplainer, explain
from cxrnn.explain.localisation import dilate, evaluate_explanations, score_map
from cxrnn.explain.registry import DEFAULT_EVAL_METHODS, DEFAULT_METHOD
from cxrnn.explain.overlay import OutputNamer, overlay_cam
from cxrnn.models.bundle import load_bundle


@pytest.fixture(scope="module")
def bundle(trained_run):
    return load_bundle(trained_run.model_path)


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def test_map_has_the_image_shape_and_values_in_unit_range(bundle):
    rng = np.random.default_rng(0)
    images = [rng.random((150, 90), dtype=np.float32), rng.random((40, 333), dtype=np.float32)]
    with CamExplainer(bundle) as explainer:
        results = explainer.explain_arrays(images)
    for image, (cam, probs, target) in zip(images, results):
        assert cam.shape == image.shape
        assert cam.dtype == np.float32
        assert cam.min() >= 0.0 and cam.max() <= 1.0
        # Attributions reached the map: a zero gradient would give an all-zero map.
        assert cam.max() > 0.5
        assert probs.shape == (len(bundle.classes),) and abs(probs.sum() - 1) < 1e-5
        assert target == int(np.argmax(probs))


@pytest.mark.parametrize("method", ["gradcam++", "xgradcam", "eigencam"])
def test_other_methods_give_valid_maps(bundle, phantom_dir, method):
    path = next((phantom_dir / "pneumonia").glob("*.png"))
    (exp,) = explain(bundle, [path], method=method, target="pneumonia")
    assert exp.error is None
    assert exp.target == (None if method == "eigencam" else "pneumonia")  # EigenCAM explains no class
    assert exp.cam.shape == exp.image.shape and 0 <= exp.cam.min() and exp.cam.max() <= 1


def test_scorecam_on_a_narrow_layer(bundle):
    # ScoreCAM runs one forward pass per channel of the layer: a 16-channel block keeps this quick.
    image = np.random.default_rng(1).random((64, 80), dtype=np.float32)
    with CamExplainer(bundle, method="scorecam", layer="blocks.0") as explainer:
        ((cam, _, _),) = explainer.explain_arrays([image])
    assert cam.shape == image.shape and 0 <= cam.min() and cam.max() <= 1


def test_target_class_and_bad_names(bundle):
    image = np.random.default_rng(2).random((64, 64), dtype=np.float32)
    with CamExplainer(bundle) as explainer:
        for name in bundle.classes:
            ((_, _, target),) = explainer.explain_arrays([image], target=name)
            assert bundle.classes[target] == name
        with pytest.raises(ValueError, match="unknown target class"):
            explainer.explain_arrays([image], target="no-such-class")
    with pytest.raises(ValueError, match="not a module"):
        CamExplainer(bundle, method="gradcam", layer="no.such.layer")
    with pytest.raises(ValueError, match="applies to the CAM methods"):
        CamExplainer(bundle, method="ig-sequence", layer="bn2")  # the sequence methods read the backbone's output
    with pytest.raises(ValueError, match="unknown explanation method"):
        CamExplainer(bundle, method="magic")


@pytest.mark.parametrize("method", ["gradcam", DEFAULT_METHOD])
def test_hooks_released_and_model_restored(bundle, method):
    layer = bundle.net.backbone.target_layer()
    flags = [p.requires_grad for p in bundle.net.parameters()]
    with CamExplainer(bundle, method=method) as explainer:
        explainer.explain_arrays([np.zeros((32, 32), dtype=np.float32)])
        assert bool(layer._forward_hooks) == (method == "gradcam")  # the sequence methods need no hook
    assert not layer._forward_hooks
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in bundle.net.modules())
    assert [p.requires_grad for p in bundle.net.parameters()] == flags
    assert all(p.grad is None for p in bundle.net.parameters())


def test_memory_stays_flat_over_200_explanations(bundle):
    rng = np.random.default_rng(3)
    images = [rng.random((48, 40), dtype=np.float32) for _ in range(8)]
    with CamExplainer(bundle, batch_size=1) as explainer:
        for image in images * 5:  # warm-up: allocator pools and lazily built kernels settle
            explainer.explain_arrays([image])
        before = _rss_mb()
        for image in images * 25:  # 200 successive explanations
            explainer.explain_arrays([image])
        grown = _rss_mb() - before
    # Keeping one 1280x7x7 activation + gradient per image would add ~100 MB here; allocator noise is a few MB.
    assert grown < 25, f"RSS grew by {grown:.1f} MB over 200 explanations"


def test_a_bad_file_gives_one_clear_error_and_the_batch_goes_on(bundle, phantom_dir, tmp_path):
    good = sorted((phantom_dir / "covid").glob("*.png"))[:2]
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"this is not an image")
    results = explain(bundle, [good[0], bad, good[1]])
    assert [r.path for r in results] == [str(good[0]), str(bad), str(good[1])]
    assert results[1].error is not None and str(bad) in results[1].error and "\n" not in results[1].error
    assert results[0].cam is not None and results[2].cam is not None


def test_explain_cli_writes_overlay_panel_and_map(trained_run, phantom_dir, tmp_path):
    good = sorted((phantom_dir / "normal").glob("*.png"))[0]
    bad = tmp_path / "empty.dcm"
    bad.write_bytes(b"")
    out = tmp_path / "maps"
    result = CliRunner().invoke(app, ["explain", str(trained_run.model_path), str(good), str(bad), "--out", str(out),
                                      "--target", "covid"])
    assert result.exit_code == 0, result.output
    assert "empty.dcm" in result.output
    stem = good.stem
    overlay = np.asarray(Image.open(out / f"{stem}_cam.png"))
    cam = np.load(out / f"{stem}_cam.npy")
    image = read_image(good)
    assert overlay.shape == (*image.shape, 3) and cam.shape == image.shape
    assert (out / f"{stem}_panel.png").stat().st_size > 0
    index = json.loads((out / "explanations.json").read_text())
    assert index["n"] == 1 and index["errors"] == 1 and index["images"][0]["target"] == "covid"


def test_predict_with_cam_adds_maps(trained_run, phantom_dir, tmp_path):
    files = sorted((phantom_dir / "pneumonia").glob("*.png"))[:2]
    out = tmp_path / "cams"
    result = CliRunner().invoke(app, ["predict", str(trained_run.model_path), *map(str, files), "--cam", str(out)])
    assert result.exit_code == 0, result.output
    for f in files:
        for suffix in ("_cam.png", "_panel.png", "_cam.npy"):
            assert (out / f"{f.stem}{suffix}").is_file()


def test_dicom_twins_give_the_same_map(bundle):
    uncompressed, jpeg2000 = reference_radiograph("RG1_UNCR.dcm"), reference_radiograph("RG1_J2KR.dcm")
    a, b = explain(bundle, [uncompressed, jpeg2000])
    assert a.error is None and b.error is None
    assert a.cam.shape == a.image.shape == b.cam.shape
    assert np.abs(a.cam - b.cam).max() < 0.02
    assert a.label == b.label


def test_overlay_and_output_names():
    image = np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4)
    cam = np.ones_like(image)
    grey = overlay_cam(image, cam, alpha=0.0)
    assert grey.shape == (3, 4, 3) and grey.dtype == np.uint8
    assert np.array_equal(grey[..., 0], np.round(image * 255).astype(np.uint8))
    assert not np.array_equal(overlay_cam(image, cam, alpha=0.5), grey)
    with pytest.raises(ValueError, match="colour map"):
        overlay_cam(image, cam, colormap="nope")
    with pytest.raises(ValueError, match="differ in size"):
        overlay_cam(image, cam[:2])
    namer = OutputNamer()
    first, second = namer("a/x.png"), namer("b/x.png")
    assert first == "x" and second.startswith("x_") and second != first


def test_pointing_game_scoring():
    lesion = np.zeros((100, 100), dtype=bool)
    lesion[40:50, 40:50] = True
    cam = np.zeros((100, 100), dtype=np.float32)
    cam[52, 45] = 1.0  # 3 px below the lesion: inside the 5%-of-width (5 px) tolerance
    near = score_map(cam, lesion, None)
    assert near["hit"] and not near["hit_strict"]  # CheXlocalize's rule (no tolerance) calls it a miss
    cam[:] = 0
    cam[45, 45] = 1.0
    assert score_map(cam, lesion, None)["hit_strict"] and score_map(cam, lesion, None)["chance_hit_strict"] == 0.01
    cam[:] = 0
    cam[60, 45] = 1.0  # 11 px away: a miss
    row = score_map(cam, lesion, np.ones_like(lesion))
    assert not row["hit"] and row["energy_in_lesion"] == 0.0 and row["energy_in_lungs"] == 1.0
    # dilation is Euclidean: a 10x10 square grown by 5 px is 20x20 with corners of radius 5 rounded off
    grown = dilate(lesion, 5)
    assert grown[35:55, 40:50].all() and grown[40:50, 35:55].all() and not grown[35, 35] and not grown[34, 45]
    assert grown.sum() == 100 + 4 * 50 + 4 * sum(1 for y in range(1, 6) for x in range(1, 6) if x * x + y * y <= 25)


def test_energy_shares_and_chance_levels_on_a_known_map():
    lesion = np.zeros((100, 100), dtype=bool)
    lesion[40:50, 40:50] = True  # 1% of the image
    lungs = np.zeros_like(lesion)
    lungs[:, 30:] = True  # 70% of the image, holding the lesion
    cam = np.zeros((100, 100), dtype=np.float32)
    cam[lesion] = 1.0  # mass 100 on the lesion
    cam[0:10, 25:35] = 3.0  # mass 300 outside it, half of it (columns 30-34) inside the lungs
    row = score_map(cam, lesion, lungs)
    assert row["energy_in_lesion"] == pytest.approx(100 / 400)
    assert row["energy_in_lungs"] == pytest.approx((100 + 150) / 400)
    assert not row["hit"] and row["peak_yx"] == [0, 25]  # the first maximum, far from the lesion
    assert row["lesion_area"] == pytest.approx(0.01) and row["lungs_area"] == pytest.approx(0.7)
    assert row["chance_hit"] == pytest.approx(dilate(lesion, 5).mean())
    # a flat map puts exactly each mask's area share of its energy in it: the chance level
    flat = score_map(np.ones_like(cam), lesion, lungs)
    assert flat["energy_in_lesion"] == pytest.approx(0.01) and flat["energy_in_lungs"] == pytest.approx(0.7)
    assert score_map(np.zeros_like(cam), lesion, None)["energy_in_lesion"] == 0.0  # no mass, no share


def test_explain_eval_on_the_phantom(trained_run, phantom_dir, tmp_path):
    out = tmp_path / "eval.json"
    result = CliRunner().invoke(app, ["explain-eval", str(trained_run.model_path), "--data", str(phantom_dir),
                                      "--out", str(out), "--curve-steps", "2"])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert list(report["methods"]) == list(DEFAULT_EVAL_METHODS)  # the default and Grad-CAM, side by side
    table = (tmp_path / "eval.md").read_text()
    abnormal = [s for s in load_dataset(phantom_dir).samples if s.label != "normal"]
    assert report["n"] == len(abnormal)
    for name, summary in report["methods"].items():
        assert f"| {name} | all | {len(abnormal)} |" in table and f"| {name} | all | {len(abnormal)} |" in result.output
        assert set(summary["per_class"]) == {"covid", "pneumonia"}
        rows = summary["images"]
        assert len(rows) == summary["n"] == report["n"] == sum(c["n"] for c in summary["per_class"].values())
        assert [r["path"] for r in rows] == [r["path"] for r in report["methods"][DEFAULT_EVAL_METHODS[0]]["images"]]
        # the summary is the mean over images, and each class's over its own images
        for key, summary_key in [("hit", "hit_rate"), ("hit_strict", "hit_rate_strict"), ("chance_hit", "chance_hit_rate"),
                                 ("energy_in_lesion", "energy_in_lesion"), ("energy_in_lungs", "energy_in_lungs"),
                                 ("deletion_auc", "deletion_auc"), ("insertion_auc", "insertion_auc")]:
            assert summary[summary_key] == pytest.approx(np.mean([r[key] for r in rows]))
            for c, part in summary["per_class"].items():
                assert part[summary_key] == pytest.approx(np.mean([r[key] for r in rows if r["label"] == c]))
        # A hit inside the lesion is a hit within 5% of it; each rate sits in its own bootstrap interval.
        assert all(r["hit"] for r in rows if r["hit_strict"])
        for key in ("hit_rate", "hit_rate_strict"):
            ci = summary[key + "_ci"]
            assert 0 <= ci["low"] <= summary[key] <= ci["high"] <= 1
        assert 0 <= summary["deletion_auc"] <= 1 and 0 <= summary["insertion_auc"] <= 1
        assert summary["seconds_per_image"] > 0
        # The maps beat a flat map: more of their energy on the lesion than the lesion's share of the image.
        assert summary["energy_in_lesion"] > summary["lesion_area_share"]
    assert 0 <= report["random"]["deletion_auc"] <= 1 and "random order" in table
    cells = report["random_cells"]
    assert 0 <= cells["deletion_auc"] <= 1 and "random cell order" in table
    assert cells["deletion_auc"] != report["random"]["deletion_auc"]  # a second order, not a copy of the first
    # The model does read the lesions: erased, most cases are called normal (so a miss is the map's fault).
    # Measured on this small model: 0.98 called abnormal with the lesion, 0.22 without.
    removed = report["lesion_removed"]
    assert removed["abnormal_rate_with_lesion"] - removed["still_abnormal_rate"] > 0.6
    bad = CliRunner().invoke(app, ["explain-eval", str(trained_run.model_path), "--data", str(phantom_dir),
                                   "--methods", "gradcam,magic"])
    assert bad.exit_code != 0 and "magic" in bad.output


def test_single_lesion_maps_peak_near_the_lesion(bundle, phantom_dir):
    # Pneumonia cases carry exactly one consolidation. The map of the class should point at it far
    # more often than a randomly placed peak would: a one-sided binomial test against the chance hit
    # rate, at p < 0.01. Over training seeds 0-3 of this fixture the bilstm mean+max head hit 0.225-0.375
    # (chance 0.076; p at most 0.003), with lesion energy 1.9-3.0x the lesion's area share. The old
    # lstm last+mean head hit 0.125 (p = 0.18) and fails here.
    from scipy.stats import binom

    dataset = load_dataset(phantom_dir, classes=bundle.classes)
    dataset.samples = [s for s in dataset.samples if s.label == "pneumonia"]
    pneumonia = evaluate_explanations(bundle, dataset, methods="gradcam", curve_steps=0
                                      )["methods"]["gradcam"]["per_class"]["pneumonia"]
    n = pneumonia["n"]
    hits = round(pneumonia["hit_rate"] * n)
    assert binom.sf(hits - 1, n, pneumonia["chance_hit_rate"]) < 0.01, (hits, n, pneumonia["chance_hit_rate"])
    assert pneumonia["energy_in_lesion"] > 1.5 * pneumonia["lesion_area_share"]


def test_explanations_carry_the_out_of_distribution_verdict(trained_run, phantom_dir, tmp_path):
    from cxrnn.inference import Predictor

    good = sorted((phantom_dir / "normal").glob("*.png"))[0]
    noise = tmp_path / "noise.png"  # nothing like a chest X-ray
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (200, 160), dtype=np.uint8)).save(noise)
    out = tmp_path / "maps"
    result = CliRunner().invoke(app, ["explain", str(trained_run.model_path), str(good), str(noise), "--out", str(out)])
    assert result.exit_code == 0, result.output
    lines = {line.split(":")[0]: line for line in result.output.splitlines() if line.endswith("_panel.png")}
    assert "OUT OF DISTRIBUTION" in lines[str(noise)] and "OUT OF DISTRIBUTION" not in lines[str(good)]
    entries = {Path(e["path"]).name: e for e in json.loads((out / "explanations.json").read_text())["images"]}
    assert entries["noise.png"]["ood"]["flagged"] and not entries[good.name]["ood"]["flagged"]
    # the verdict is the predictor's: same score, same threshold
    predicted = {Path(p.path).name: p.ood for p in Predictor.from_file(trained_run.model_path).predict_paths([good, noise])}
    for name, entry in entries.items():
        assert entry["ood"]["threshold"] == predicted[name]["threshold"]
        assert entry["ood"]["score"] == pytest.approx(predicted[name]["score"], rel=1e-4)


def test_a_large_image_is_explained_within_the_map_and_display_limits(bundle, trained_run, tmp_path, monkeypatch):
    # The limits scaled down (the real ones are 4096 x 4096 map pixels and 2048 display pixels), so a
    # 300 x 200 image stands in for a 9000 x 6000 scan: the map is kept within the pixel limit with the
    # image's aspect, the overlay and panel are drawn at the display size, and the index says both sizes.
    import cxrnn.explain.cam as cam_module

    monkeypatch.setattr(cam_module, "MAP_MAX_PIXELS", 100 * 100)
    monkeypatch.setattr(cam_module, "DISPLAY_MAX_SIDE", 64)
    y, x = np.mgrid[0:300, 0:200]
    Image.fromarray(((np.sin(x / 9) + np.cos(y / 13) + 2) * 60).astype(np.uint8)).save(tmp_path / "big.png")
    out = tmp_path / "maps"
    result = CliRunner().invoke(app, ["explain", str(trained_run.model_path), str(tmp_path / "big.png"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    (entry,) = json.loads((out / "explanations.json").read_text())["images"]
    assert entry["image_size"] == [200, 300]
    width, height = entry["map_size"]
    assert width * height <= 100 * 100 and abs(height / width - 1.5) < 0.02
    cam = np.load(out / "big_cam.npy")
    assert cam.shape == (height, width) and cam.dtype == np.float32 and cam.max() > 0.5
    with Image.open(out / "big_cam.png") as overlay:
        assert overlay.size == (43, 64)  # the long side at the display limit, aspect kept
    # The prediction is the one predict gives: the model saw the same input (the whole image resized).
    (exp,) = explain(bundle, [tmp_path / "big.png"])
    predicted = CliRunner().invoke(app, ["predict", str(trained_run.model_path), str(tmp_path / "big.png"), "--json"])
    assert json.loads(predicted.output.splitlines()[-1])["probabilities"] == pytest.approx(exp.probabilities, abs=1e-6)
