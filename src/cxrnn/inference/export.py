"""``cxrnn export`` and the feature extractor's backbone file: a torch module as ONNX or TorchScript.

One exporter for every graph: the inference graph (probabilities, logits, OOD score) of a saved model,
and a frozen backbone's feature map for extraction. Inputs are named ``image`` (B, 3, S, S) with a free
batch axis; files are written through ``cxrnn.utils.atomic`` (concurrent torchrun processes may export
at once, and an interrupted export must not leave a truncated file that a later run would load). A model
export carries the classes, preprocessing and OOD threshold as metadata so it can be used without cxrnn.
The paper head's ReLU-LSTM is a Python loop: the TorchScript-based ONNX exporter traces it into an
unrolled graph (its step count is fixed by the backbone, so that is exact).
"""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from cxrnn.inference.graph import OUTPUT_NAMES, InferenceModule
from cxrnn.models.bundle import ModelBundle, load_bundle
from cxrnn.models.ood import OodStats
from cxrnn.models.backbones import Preprocessing
from cxrnn.utils.atomic import atomic_write

FORMATS = ("onnx", "torchscript")
OPSET = 17
INPUT_NAME = "image"


def export_metadata(bundle: ModelBundle) -> dict[str, str]:
    """What a consumer without cxrnn needs to feed the graph and read its outputs (JSON-encoded values)."""
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


def _example_input(preprocessing: Preprocessing, batch: int = 2) -> torch.Tensor:
    """A fixed tracing input; batch 2 so that no size-1 axis is specialised away by the tracer."""
    size = preprocessing.input_size
    return torch.rand(batch, preprocessing.channels, size, size, generator=torch.Generator().manual_seed(0))


def export_onnx(module: nn.Module, example: torch.Tensor, path: str | Path, output_names: Sequence[str],
                metadata: Mapping[str, str] | None = None, opset: int = OPSET) -> Path:
    """``module`` traced on ``example`` as a checked ONNX file with a free batch axis on every input and
    output and ``metadata`` in its ``metadata_props``, written atomically to ``path``."""
    import onnx

    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        # Tracer warnings about the unrolled loop and shape asserts, and the TorchScript-based exporter's
        # deprecation notice, are expected.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module.eval(), (example,), buf, dynamo=False, opset_version=opset,
            input_names=[INPUT_NAME], output_names=list(output_names),
            dynamic_axes={name: {0: "batch"} for name in (INPUT_NAME, *output_names)},
        )
    model = onnx.load_model_from_string(buf.getvalue())
    for key, value in (metadata or {}).items():
        model.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(model)
    data = model.SerializeToString()
    return atomic_write(path, lambda fh: fh.write(data))


def export_torchscript(module: nn.Module, example: torch.Tensor, path: str | Path,
                       metadata: Mapping[str, str] | None = None) -> Path:
    """``module`` traced on ``example`` as TorchScript, ``metadata`` as ``<key>.json`` extra files, written
    atomically to ``path``.

    torch marks TorchScript deprecated in favour of torch.export, but a TorchScript file is still what
    libtorch (C++) and older deployments load without Python, so it stays; its warnings are noise here.
    """
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(module.eval(), (example,))
    extra = {f"{k}.json": v for k, v in (metadata or {}).items()}
    return atomic_write(path, lambda fh: torch.jit.save(traced, fh, _extra_files=extra))


def export_model(model: str | Path | ModelBundle, fmt: str, out: str | Path) -> Path:
    """Export a saved model (``model.pt`` or a loaded bundle) to ``out`` in ``fmt`` (onnx or torchscript)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}: use one of {', '.join(FORMATS)}")
    bundle = model if isinstance(model, ModelBundle) else load_bundle(model)
    module, example, meta = InferenceModule(bundle), _example_input(bundle.preprocessing), export_metadata(bundle)
    if fmt == "onnx":
        return export_onnx(module, example, out, OUTPUT_NAMES, meta)
    return export_torchscript(module, example, out, meta)
