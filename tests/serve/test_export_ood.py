"""ONNX / TorchScript exports match PyTorch; the out-of-distribution gate flags photos and noise, not X-rays."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cxrnn.inference.export import export_model
from cxrnn.inference.graph import OnnxEngine, TorchEngine
from cxrnn.models.bundle import load_bundle, save_bundle
from cxrnn.models.ood import OodStats, fit_ood_stats
from cxrnn.inference.predictor import Predictor


@pytest.mark.parametrize("head", ["lstm", "paper"])
def test_onnx_matches_pytorch_with_a_free_batch_axis(head, tmp_path, make_tiny_bundle):
    import onnx

    bundle = make_tiny_bundle(head)
    path = export_model(bundle, "onnx", tmp_path / "model.onnx")
    meta = {p.key: json.loads(p.value) for p in onnx.load(str(path)).metadata_props}
    assert meta["classes"] == bundle.classes and meta["ood_threshold"] > 0
    onnx_engine, torch_engine = OnnxEngine(path), TorchEngine(bundle)
    size = bundle.preprocessing.input_size
    for batch in (1, 5):  # the export used batch 2
        x = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))
        ours, theirs = torch_engine(x), onnx_engine(x)
        assert theirs["probabilities"].shape == (batch, 3)
        np.testing.assert_allclose(theirs["probabilities"], ours["probabilities"], atol=1e-4, rtol=0)
        np.testing.assert_allclose(theirs["ood_score"], ours["ood_score"], rtol=1e-4, atol=1e-4)
        assert ours["probabilities"].std() > 1e-4  # a constant output would make the comparison empty


@pytest.mark.filterwarnings("ignore:`torch.jit")  # deprecated upstream, still the format libtorch loads
def test_torchscript_matches_pytorch(tmp_path, make_tiny_bundle):
    bundle = make_tiny_bundle("lstm")
    path = export_model(bundle, "torchscript", tmp_path / "model.ts")
    loaded = torch.jit.load(str(path))
    size = bundle.preprocessing.input_size
    x = torch.rand(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        probs, _, score = loaded(x)
    ours = TorchEngine(bundle)(x)
    np.testing.assert_allclose(probs.numpy(), ours["probabilities"], atol=1e-5)
    np.testing.assert_allclose(score.numpy(), ours["ood_score"], rtol=1e-5)


def test_unknown_export_format_is_refused(tmp_path, make_tiny_bundle):
    with pytest.raises(ValueError, match="onnx or torchscript|onnx, torchscript"):
        export_model(make_tiny_bundle("pool", with_ood=False), "tflite", tmp_path / "m")


def test_stats_survive_a_weights_only_round_trip(tmp_path, make_tiny_bundle):
    bundle = make_tiny_bundle("pool")
    path = save_bundle(bundle, tmp_path / "model.pt")
    loaded = OodStats.from_extras(load_bundle(path).extras)
    original = OodStats.from_extras(bundle.extras)
    assert loaded is not None and loaded.threshold == pytest.approx(original.threshold)
    probe = np.random.default_rng(1).normal(size=(4, original.mean.size))
    np.testing.assert_allclose(loaded.score(probe), original.score(probe), rtol=1e-4)


def test_out_of_fold_threshold_keeps_unseen_inliers_and_flags_outliers():
    rng = np.random.default_rng(0)
    dim, n = 64, 120  # fewer images than twice the dimension: in-sample distances would be biased low
    basis = rng.normal(size=(dim, dim)) / np.sqrt(dim)
    train = rng.normal(size=(n, dim)) @ basis
    stats = fit_ood_stats(train)
    unseen = rng.normal(size=(2000, dim)) @ basis
    assert stats.flag(stats.score(unseen)).mean() < 0.05
    assert stats.flag(stats.score(unseen * 3.0)).mean() > 0.95
    with pytest.raises(ValueError, match="at least"):
        fit_ood_stats(train[:5])


def _test_split_paths(run_dir: Path) -> list[str]:
    with open(run_dir / "predictions.csv", newline="") as fh:
        return [row["path"] for row in csv.DictReader(fh)]


def test_trained_model_flags_a_photo_and_noise_but_not_phantom_test_images(trained_run, tmp_path):
    import matplotlib.cbook
    from PIL import Image

    predictor = Predictor.from_file(trained_run.model_path)
    assert predictor.ood_stats is not None, "training did not store the OOD statistics"
    test_paths = _test_split_paths(Path(trained_run.run_dir))
    results = predictor.predict_paths(test_paths)
    flagged = [p.path for p in results if p.ood["flagged"]]
    assert len(results) >= 10 and len(flagged) <= 0.05 * len(results), flagged

    photo = Path(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
    noise_path = tmp_path / "noise.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (256, 256), dtype=np.uint8)).save(noise_path)
    photo_pred, noise_pred = predictor.predict_paths([photo, noise_path])
    assert photo_pred.ood["flagged"], photo_pred.ood
    assert noise_pred.ood["flagged"], noise_pred.ood
    assert photo_pred.to_dict()["ood"]["score"] > predictor.ood_stats.threshold


def test_onnx_runtime_predictor_agrees_with_torch_on_the_trained_model(trained_run):
    paths = _test_split_paths(Path(trained_run.run_dir))[:4]
    torch_preds = Predictor.from_file(trained_run.model_path).predict_paths(paths)
    onnx_preds = Predictor.from_file(trained_run.model_path, runtime="onnx").predict_paths(paths)
    for a, b in zip(torch_preds, onnx_preds):
        assert a.label == b.label
        for c in a.probabilities:
            assert abs(a.probabilities[c] - b.probabilities[c]) < 1e-4
        assert a.ood["flagged"] == b.ood["flagged"]
        assert b.ood["score"] == pytest.approx(a.ood["score"], rel=1e-3)
