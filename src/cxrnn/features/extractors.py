"""What runs a frozen backbone during feature extraction: the torch or the ONNX engine.

ONNX Runtime is the faster fp32 CPU engine for these networks (benchmarks/inference.py, batch 16: VGG19
reached 95% of the machine's fp32 matmul rate against 79% for torch channels_last; the five backbones ran
1.2-1.7x torch's throughput), so ``auto`` picks it for fp32 extraction on the CPU when onnxruntime is
installed. bf16 and CUDA stay with torch (autocast and AMP are torch features). The backbone is exported
once per feature store and kept there; a backbone the exporter cannot handle falls back to torch with one
warning under ``auto`` and is an error under an explicit ``onnx``.

The engines are the predictor's (``cxrnn.inference.engines``) and the export is ``cxrnn export``'s
(``cxrnn.inference.export``). Both engines compute the same fp32 maps up to summation order (a test holds
them to 1e-4), so the store's key does not depend on the engine, just as it does not depend on the thread
count.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from cxrnn.inference.engines import RUNTIMES, Engine, OnnxEngine, TorchEngine
from cxrnn.inference.export import export_onnx
from cxrnn.models.backbones import Backbone

EXTRACT_RUNTIMES = ("auto", *RUNTIMES)
FEATURES = "features"  # the backbone graph's one output: (B, C, H, W) feature maps


class Extractor:
    """A backbone behind an engine; ``extractor(x)`` is the (B, C, H, W) float32 maps of a batch."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.name = engine.name  # "torch" or "onnx": what the store reports as the engine it ran

    def __call__(self, x: torch.Tensor) -> np.ndarray:
        return self.engine(x)[FEATURES]


def _backbone_metadata(backbone: Backbone) -> dict[str, str]:
    """Which backbone and weights a ``backbone.onnx`` holds, for whoever finds the file in a store."""
    meta = {"backbone": backbone.spec.name, "weights": backbone.weights_id,
            "preprocessing": backbone.preprocessing.to_dict()}
    return {k: json.dumps(v) for k, v in meta.items()}


def onnx_extractor(backbone: Backbone, onnx_path: str | Path, threads: int | None = None) -> Extractor:
    """The ONNX engine over ``onnx_path``, exporting the backbone there first if the file is missing."""
    path = Path(onnx_path)
    if not path.exists():
        size = backbone.preprocessing.input_size
        example = torch.zeros(1, backbone.preprocessing.channels, size, size)
        # the exporter traces the weights as they lie: the plain CPU layout, not a torch engine's channels_last
        module = backbone.eval().to(device="cpu", memory_format=torch.contiguous_format)
        export_onnx(module, example, path, (FEATURES,), _backbone_metadata(backbone))
    return Extractor(OnnxEngine(path, (FEATURES,), threads=threads or torch.get_num_threads()))


def _onnxruntime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def check_extract_runtime(name: str) -> str:
    """``name`` if it is auto, torch or onnx, so a typo fails when the store is made, not at the first batch."""
    if name not in EXTRACT_RUNTIMES:
        raise ValueError(f"extraction runtime must be one of {', '.join(EXTRACT_RUNTIMES)}, not {name!r}")
    return name


def make_extractor(backbone: Backbone, requested: str, device: torch.device, precision: str,
                   onnx_path: Path, warn: Callable[[str], None]) -> Extractor:
    """The engine for ``requested`` (auto|torch|onnx) on ``device`` at ``precision``; ``auto`` never fails
    for want of onnxruntime or an exportable backbone, it warns once and extracts with torch."""
    check_extract_runtime(requested)
    if requested == "onnx" and (device.type != "cpu" or precision != "fp32"):
        raise ValueError("--runtime onnx extracts in fp32 on the CPU; use torch for bf16 or cuda")
    use_onnx = requested == "onnx" or (
        requested == "auto" and device.type == "cpu" and precision == "fp32" and _onnxruntime_available())
    if use_onnx:
        try:
            return onnx_extractor(backbone, onnx_path)
        except Exception as exc:  # noqa: BLE001 - any exporter/runtime failure means: use torch instead
            if requested == "onnx":
                raise RuntimeError(f"ONNX export of backbone {backbone.spec.name} failed: {exc}") from exc
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            warn(f"onnxruntime unavailable for {backbone.spec.name} ({first_line}); extracting with torch")
    return Extractor(TorchEngine(backbone, (FEATURES,), device, precision))
