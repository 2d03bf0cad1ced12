"""ONNX / TorchScript exports match PyTorch; the out-of-distribution gate flags photos and noise, not X-rays."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cxrnn.inference.engines import OnnxEngine, TorchEngine
from cxrnn.inference.export import export_model
from cxrnn.inference.graph import OUTPUT_NAMES, InferenceModule
from cxrnn.inference.predictor import Predictor
from cxrnn.models.bundle import load_bundle, save_bundle
from cxrnn.models.ood import OodStats, fit_ood_stats


def _reference(bundle, x: torch.Tensor) -> dict[str, np.ndarray]:
    """The outputs computed without the inference graph: head on the backbone's map, softmax at the bundle's
    temperature, and the gate's numpy Mahalanobis distance of the pooled map."""
    with torch.no_grad():
        fmap = bundle.net.backbone(x)
        logits = bundle.net.head(fmap)
    stats = OodStats.from_extras(bundle.extras)
    return {"probabilities": torch.softmax(logits / bundle.temperature, dim=1).numpy(), "logits": logits.numpy(),
            "ood_score": stats.score(fmap.mean(dim=(2, 3)).double().numpy())}


def _assert_matches(got: dict[str, np.ndarray], want: dict[str, np.ndarray], tol: float) -> None:
    assert set(got) == set(OUTPUT_NAMES)
    for name in OUTPUT_NAMES:
        assert got[name].dtype == np.float32, name
        np.testing.assert_allclose(got[name], want[name], rtol=tol, atol=tol, err_msg=name)


@pytest.mark.parametrize("head", ["lstm", "paper"])
def test_onnx_matches_pytorch_with_a_free_batch_axis(head, tmp_path, make_tiny_bundle):
    import onnx

    bundle = make_tiny_bundle(head)
    path = export_model(bundle, "onnx", tmp_path / "model.onnx")
    assert sorted(tmp_path.iterdir()) == [path]  # written through a temp file that is gone
    model = onnx.load(str(path))
    meta = {p.key: json.loads(p.value) for p in model.metadata_props}
    assert meta["classes"] == bundle.classes
    assert meta["preprocessing"] == bundle.preprocessing.to_dict()
    assert (meta["backbone"], meta["head"], meta["temperature"]) == (bundle.backbone_name, head, 1.5)
    assert meta["ood_threshold"] == pytest.approx(OodStats.from_extras(bundle.extras).threshold)
    assert [i.name for i in model.graph.input] == ["image"]
    assert [o.name for o in model.graph.output] == list(OUTPUT_NAMES)
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"

    size = bundle.preprocessing.input_size
    xs = [torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(batch)) for batch in (1, 5)]
    wanted = [_reference(bundle, x) for x in xs]  # before the torch engine re-lays the weights out
    onnx_engine, torch_engine = OnnxEngine(path, OUTPUT_NAMES), TorchEngine(InferenceModule(bundle), OUTPUT_NAMES)
    assert (onnx_engine.name, torch_engine.name) == ("onnx", "torch")
    for x, want in zip(xs, wanted):  # the export used batch 2
        ours, theirs = torch_engine(x), onnx_engine(x)
        assert theirs["probabilities"].shape == (len(x), 3) and theirs["ood_score"].shape == (len(x),)
        _assert_matches(ours, want, 1e-5)
        _assert_matches(theirs, ours, 1e-4)
        assert ours["probabilities"].std() > 1e-4  # a constant output would make the comparison empty


@pytest.mark.filterwarnings("ignore:`torch.jit")  # deprecated upstream, still the format libtorch loads
def test_torchscript_matches_pytorch(tmp_path, make_tiny_bundle):
    bundle = make_tiny_bundle("lstm")
    path = export_model(bundle, "torchscript", tmp_path / "model.ts")
    assert sorted(tmp_path.iterdir()) == [path]
    extra = {"classes.json": "", "temperature.json": "", "ood_threshold.json": ""}
    loaded = torch.jit.load(str(path), _extra_files=extra)
    assert json.loads(extra["classes.json"]) == bundle.classes and json.loads(extra["temperature.json"]) == 1.5
    assert json.loads(extra["ood_threshold.json"]) == pytest.approx(OodStats.from_extras(bundle.extras).threshold)
    size = bundle.preprocessing.input_size
    x = torch.rand(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        outs = loaded(x)
    _assert_matches({k: v.numpy() for k, v in zip(OUTPUT_NAMES, outs)}, _reference(bundle, x), 1e-5)


@pytest.mark.filterwarnings("ignore:`torch.jit")
def test_a_failed_export_keeps_the_previous_file_and_leaves_no_temp_file(tmp_path, make_tiny_bundle, monkeypatch):
    import onnx

    bundle = make_tiny_bundle("pool")
    ts, onnx_path = tmp_path / "model.ts", tmp_path / "model.onnx"
    ts.write_bytes(b"previous")
    onnx_path.write_bytes(b"previous")

    def half_save(traced, fh, **kwargs):
        fh.write(b"half a file")
        raise OSError("disk full")

    def reject(model):
        raise onnx.checker.ValidationError("bad graph")

    monkeypatch.setattr(torch.jit, "save", half_save)
    monkeypatch.setattr(onnx.checker, "check_model", reject)
    with pytest.raises(OSError, match="disk full"):
        export_model(bundle, "torchscript", ts)
    with pytest.raises(onnx.checker.ValidationError, match="bad graph"):
        export_model(bundle, "onnx", onnx_path)
    assert ts.read_bytes() == onnx_path.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.ts"]


def test_unknown_export_format_is_refused(tmp_path, make_tiny_bundle):
    with pytest.raises(ValueError, match="onnx, torchscript"):
        export_model(make_tiny_bundle("pool", with_ood=False), "tflite", tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


def test_predictor_refuses_an_unknown_runtime_and_onnx_off_fp32_cpu(make_tiny_bundle):
    bundle = make_tiny_bundle("pool")
    with pytest.raises(ValueError, match="unknown runtime 'tensorrt': use one of torch, onnx"):
        Predictor(bundle, runtime="tensorrt")
    for kwargs in ({"precision": "bf16"}, {"device": "cuda"}):
        with pytest.raises(ValueError, match="apply to the torch runtime; onnx runs fp32 on the CPU"):
            Predictor(bundle, runtime="onnx", **kwargs)


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
    torch_predictor = Predictor.from_file(trained_run.model_path)
    onnx_predictor = Predictor.from_file(trained_run.model_path, runtime="onnx")
    assert (torch_predictor.engine.name, onnx_predictor.engine.name) == ("torch", "onnx")
    torch_preds, onnx_preds = torch_predictor.predict_paths(paths), onnx_predictor.predict_paths(paths)
    assert len(torch_preds) == len(onnx_preds) == 4
    for a, b in zip(torch_preds, onnx_preds):
        assert a.label == b.label
        for c in a.probabilities:
            assert abs(a.probabilities[c] - b.probabilities[c]) < 1e-4
        assert a.ood["flagged"] == b.ood["flagged"]
        assert b.ood["score"] == pytest.approx(a.ood["score"], rel=1e-3)
