"""``cxrnn export``: the inference graph (probabilities, logits, OOD score) as ONNX or TorchScript.

Both formats take the preprocessed input tensor ``image`` (B, 3, S, S) with a free batch axis; the
exported file carries the classes, preprocessing and OOD threshold as metadata so it can be used without
cxrnn. The paper head's ReLU-LSTM is a Python loop: the TorchScript-based ONNX exporter traces it into an
unrolled graph (its step count is fixed by the backbone, so that is exact).
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from cxrnn.inference.graph import OUTPUT_NAMES, InferenceModule
from cxrnn.models.bundle import ModelBundle, load_bundle
from cxrnn.models.ood import OodStats

FORMATS = ("onnx", "torchscript")
OPSET = 17


def export_metadata(bundle: ModelBundle) -> dict[str, str]:
    stats = OodStats.from_extras(bundle.extras)
    meta: dict[str, Any] = {
        "classes": bundle.classes,
        "preprocessing": bundle.preprocessing.to_dict(),
        "backbone": bundle.backbone_name,
        "head": bundle.head_name,
        "temperature": bundle.temperature,
        "ood_threshold": stats.threshold if stats else None,
        "inputs": "image: (B, 3, S, S) float32, grey X-ray in [0,1] resized to SxS, replicated to 3 channels, (x-mean)/std",
        "outputs": "probabilities (B, K); logits (B, K); ood_score (B,) Mahalanobis distance, flag if > ood_threshold",
    }
    return {k: json.dumps(v) for k, v in meta.items()}


def _example_input(bundle: ModelBundle, batch: int = 2) -> torch.Tensor:
    size = bundle.preprocessing.input_size
    return torch.rand(batch, bundle.preprocessing.channels, size, size, generator=torch.Generator().manual_seed(0))


def _atomic_target(path: Path) -> tuple[Path, Path]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    return path, Path(tmp)


def export_onnx(bundle: ModelBundle, path: str | Path, opset: int = OPSET) -> Path:
    import onnx

    path, tmp = _atomic_target(Path(path))
    module = InferenceModule(bundle).eval()
    try:
        with warnings.catch_warnings():
            # Tracer warnings about the unrolled loop and shape asserts are expected.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module, (_example_input(bundle),), str(tmp), dynamo=False, opset_version=opset,
                input_names=["image"], output_names=list(OUTPUT_NAMES),
                dynamic_axes={"image": {0: "batch"}, **{name: {0: "batch"} for name in OUTPUT_NAMES}},
            )
        model = onnx.load(str(tmp))
        for key, value in export_metadata(bundle).items():
            model.metadata_props.add(key=key, value=value)
        onnx.checker.check_model(model)
        onnx.save(model, str(tmp))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def export_torchscript(bundle: ModelBundle, path: str | Path) -> Path:
    path, tmp = _atomic_target(Path(path))
    module = InferenceModule(bundle).eval()
    try:
        # torch marks TorchScript deprecated in favour of torch.export, but a TorchScript file is still what
        # libtorch (C++) and older deployments load without Python, so it stays; its warnings are noise here.
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(module, (_example_input(bundle),))
            torch.jit.save(traced, str(tmp), _extra_files={f"{k}.json": v for k, v in export_metadata(bundle).items()})
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def export_model(model: str | Path | ModelBundle, fmt: str, out: str | Path) -> Path:
    """Export a saved model (``model.pt``) to ``out`` in ``fmt`` (onnx or torchscript)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}: use one of {', '.join(FORMATS)}")
    bundle = model if isinstance(model, ModelBundle) else load_bundle(model)
    return export_onnx(bundle, out) if fmt == "onnx" else export_torchscript(bundle, out)
