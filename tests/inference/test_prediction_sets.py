"""Issue 15, consumer side: the predictor turns a model's stored conformal calibration into a prediction set
per image and a referral (``refer``, ``refer_reason``), the same for the torch and onnx engines; an older
model file predicts with ``prediction_set`` None and the command line says so once."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cxrnn.cli import app
from cxrnn.inference.predictor import NO_CONFORMAL_NOTICE, Predictor, predict, referral
from cxrnn.models.bundle import load_bundle, save_bundle
from cxrnn.models.conformal import EXTRAS_KEY, ConformalSets

runner = CliRunner()
CLASSES = ("covid", "normal", "pneumonia")


def _phantom_split(phantom_dir: Path) -> tuple[list[Path], np.ndarray, list[Path]]:
    """(calibration paths, their labels, held-out paths): alternate phantom images per class, so no
    held-out image's score is exactly a calibration threshold."""
    calib, labels, held = [], [], []
    for k, name in enumerate(CLASSES):
        files = sorted((phantom_dir / name).glob("*.png"))
        calib += files[0::2]
        labels += [k] * len(files[0::2])
        held += files[1::2]
    return calib, np.asarray(labels), held


@pytest.fixture(scope="module")
def split(phantom_dir):
    return _phantom_split(phantom_dir)


@pytest.fixture(scope="module")
def conformal_model(trained_run, split, tmp_path_factory) -> Path:
    """The session's trained model with a 90% conformal calibration fitted on half the phantom images."""
    bundle = load_bundle(trained_run.model_path)
    bundle.extras.pop(EXTRAS_KEY, None)
    calib, labels, _ = split
    probs = np.array([[p.probabilities[c] for c in bundle.classes] for p in Predictor(bundle).predict_paths(calib)])
    bundle.extras[EXTRAS_KEY] = ConformalSets.calibrate(probs, labels, bundle.classes, 0.9,
                                                        calibrated_on="half the test phantom").to_extras()
    return save_bundle(bundle, tmp_path_factory.mktemp("conformal") / "model.pt")


@pytest.fixture(scope="module")
def old_model(trained_run, tmp_path_factory) -> Path:
    """The trained model as a file from before prediction sets: no conformal extras."""
    bundle = load_bundle(trained_run.model_path)
    bundle.extras.pop(EXTRAS_KEY, None)
    return save_bundle(bundle, tmp_path_factory.mktemp("old") / "model.pt")


@pytest.fixture(scope="module")
def odd_images(tmp_path_factory) -> tuple[Path, Path]:
    """(a photograph of a person, uniform random noise): neither is a chest X-ray."""
    import matplotlib.cbook

    folder = tmp_path_factory.mktemp("odd")
    photo = folder / "grace_hopper.jpg"
    shutil.copyfile(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False), photo)
    noise = folder / "noise.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (256, 256), dtype=np.uint8)).save(noise)
    return photo, noise


def _probs(prediction, classes) -> np.ndarray:
    return np.array([prediction.probabilities[c] for c in classes])


def _json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_referral_for_singleton_several_empty_and_ood_sets():
    ood_in, ood_out = {"flagged": False}, {"flagged": True}
    assert referral(["covid"], ood_in, 0.9) == (False, None)
    assert referral(["covid"], None, 0.9) == (False, None)
    assert referral(["covid", "pneumonia"], ood_in, 0.9) == (
        True, "prediction set {covid, pneumonia}: the model cannot tell these apart at 90% coverage")
    assert referral([], ood_in, 0.9) == (True, "empty prediction set: no class reaches the calibrated threshold")
    assert referral(["normal"], ood_out, 0.9) == (True, "out of distribution: unlike the training images")
    assert referral([], ood_out, 0.95) == (
        True, "empty prediction set: no class reaches the calibrated threshold; "
              "out of distribution: unlike the training images")
    # a model without conformal calibration: the OOD gate alone decides
    assert referral(None, ood_in, None) == (False, None)
    assert referral(None, ood_out, None) == (True, "out of distribution: unlike the training images")


def test_to_prediction_applies_the_sets_and_refers(trained_run):
    bundle = load_bundle(trained_run.model_path)
    # class k is in the set iff 1 - p_k <= 0.5, i.e. p_k >= 0.5
    bundle.extras[EXTRAS_KEY] = ConformalSets(CLASSES, 0.9, (0.5, 0.5, 0.5), (20, 20, 20), "by hand").to_extras()
    predictor = Predictor(bundle)
    threshold = predictor.ood_stats.threshold
    single = predictor.to_prediction("a", np.array([0.9, 0.05, 0.05], dtype=np.float32), 0.0)
    assert (single.prediction_set, single.refer, single.refer_reason) == (["covid"], False, None)
    several = predictor.to_prediction("b", np.array([0.5, 0.0, 0.5], dtype=np.float32), 0.0)
    assert several.prediction_set == ["covid", "pneumonia"] and several.refer
    assert several.refer_reason == "prediction set {covid, pneumonia}: the model cannot tell these apart at 90% coverage"
    empty = predictor.to_prediction("c", np.array([0.34, 0.33, 0.33], dtype=np.float32), 0.0)
    assert empty.prediction_set == [] and empty.refer and empty.refer_reason.startswith("empty prediction set")
    ood = predictor.to_prediction("d", np.array([0.9, 0.05, 0.05], dtype=np.float32), threshold * 2)
    assert ood.prediction_set == ["covid"] and ood.refer and ood.refer_reason == (
        "out of distribution: unlike the training images")
    record = several.to_dict()
    assert set(record) == {"path", "label", "probabilities", "ood", "warnings", "prediction_set", "refer",
                           "refer_reason"}
    assert json.loads(json.dumps(record)) == record


def test_sets_are_the_calibrations_sets_of_the_probabilities(conformal_model, split):
    _, _, held = split
    bundle = load_bundle(conformal_model)
    sets = ConformalSets.from_extras(bundle.extras)
    predictions = Predictor(bundle).predict_paths(held)
    probs = np.array([_probs(p, bundle.classes) for p in predictions])
    mask = sets.prediction_sets(probs)
    for p, row in zip(predictions, mask):
        assert set(p.prediction_set) <= set(bundle.classes)
        assert p.prediction_set == [c for c, keep in zip(bundle.classes, row) if keep]
        assert p.refer == (len(p.prediction_set) != 1 or p.ood["flagged"])
    # a useful calibration on an easy phantom: most held-out images get exactly their one class
    assert np.mean(mask.sum(axis=1) == 1) >= 0.8, mask.sum(axis=1)


def test_torch_and_onnx_runtimes_give_identical_sets(conformal_model, split):
    _, _, held = split
    paths = held[::4]
    bundle = load_bundle(conformal_model)
    torch_preds = Predictor(bundle).predict_paths(paths)
    onnx_preds = Predictor(bundle, runtime="onnx").predict_paths(paths)
    assert [p.prediction_set for p in torch_preds] == [p.prediction_set for p in onnx_preds]
    assert [(p.refer, p.refer_reason) for p in torch_preds] == [(p.refer, p.refer_reason) for p in onnx_preds]


def test_photo_and_noise_are_referred(conformal_model, odd_images):
    photo, noise = odd_images
    for p in predict(conformal_model, [photo, noise]):
        assert p.refer, p.to_dict()
        # the trained model's OOD gate flags both (test_export_ood checks the gate itself)
        assert p.ood["flagged"] and "out of distribution: unlike the training images" in p.refer_reason


def test_old_model_predicts_without_sets_and_the_cli_says_so_once(old_model, split, odd_images):
    _, _, held = split
    files = [str(f) for f in held[:3]] + [str(odd_images[1])]
    predictions = Predictor.from_file(old_model).predict_paths(files)
    assert [p.prediction_set for p in predictions] == [None] * 4
    assert all(p.refer == p.ood["flagged"] for p in predictions)
    assert predictions[-1].refer and predictions[-1].refer_reason == "out of distribution: unlike the training images"

    for extra in ([], ["--json"]):
        result = runner.invoke(app, ["predict", str(old_model), *files, *extra])
        assert result.exit_code == 0, result.output
        notices = [line for line in result.stderr.splitlines() if NO_CONFORMAL_NOTICE in line]
        assert notices == [f"warning: {old_model}: {NO_CONFORMAL_NOTICE}"]
        if extra:
            records = {r["path"]: r for r in _json_lines(result.stdout)}
            assert [records[f]["prediction_set"] for f in files] == [None] * 4
            assert records[files[-1]]["refer"] is True
        else:
            lines = result.stdout.splitlines()
            assert len(lines) == 4 and not any("  set {" in line for line in lines)
            assert [line for line in lines if "REFER" in line] == [
                line for line in lines if line.startswith(files[-1] + ":")]


def test_cli_predict_shows_the_set_and_refer_on_each_line(conformal_model, split, odd_images):
    _, _, held = split
    files = [str(held[0]), str(odd_images[1])]
    plain = runner.invoke(app, ["predict", str(conformal_model), *files], env={"COLUMNS": "80"})
    assert plain.exit_code == 0, plain.output
    assert NO_CONFORMAL_NOTICE not in plain.stderr
    lines = plain.stdout.splitlines()
    assert len(lines) == 2, lines
    as_json = runner.invoke(app, ["predict", str(conformal_model), *files, "--json"])
    records = _json_lines(as_json.stdout)
    assert [r["path"] for r in records] == [line.split(": ")[0] for line in lines]
    for line, record in zip(lines, records):
        assert f"  set {{{', '.join(record['prediction_set'])}}}" in line
        assert ("REFER" in line) == record["refer"]
    noise = {r["path"]: r for r in records}[files[1]]
    assert noise["refer"] is True and "out of distribution" in noise["refer_reason"]
    (noise_line,) = [line for line in lines if line.startswith(files[1] + ":")]
    assert noise_line.endswith("OUT OF DISTRIBUTION  REFER")
