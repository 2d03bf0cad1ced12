"""What runs a frozen backbone during feature extraction: PyTorch or ONNX Runtime.

ONNX Runtime is the faster fp32 CPU engine for these networks (benchmarks/inference.py, batch 16: VGG19
reached 95% of the machine's fp32 matmul rate against 79% for torch channels_last; the five backbones ran
1.2-1.7x torch's throughput), so ``auto`` picks it for fp32 extraction on the CPU when onnxruntime is
installed. bf16 and CUDA stay with torch (autocast and AMP are torch features). The backbone is exported
once per feature store and kept there; a backbone the exporter cannot handle falls back to torch with one
warning under ``auto`` and is an error under an explicit ``onnx``.

Both engines compute the same fp32 maps up to summation order (a test holds them to 1e-4), so the
store's key does not depend on the engine, just as it does not depend on the thread count.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch

from cxrnn.inference import device as runtime
from cxrnn.utils.atomic import atomic_write
from cxrnn.inference.export import OPSET
from cxrnn.models.backbones import Backbone

EXTRACT_RUNTIMES = ("auto", "torch", "onnx")


class Extractor(Protocol):
    name: str

    def __call__(self, x: torch.Tensor) -> np.ndarray: ...


class TorchExtractor:
    """The backbone in channels_last on its device, under the chosen precision; float32 numpy out."""

    name = "torch"

    def __init__(self, backbone: Backbone, device: torch.device, precision: str):
        self.device = device
        self.precision = precision
        self.module = runtime.prepare_module(backbone.eval(), device)

    def __call__(self, x: torch.Tensor) -> np.ndarray:
        with torch.inference_mode(), runtime.autocast(self.device, self.precision):
            maps = self.module(runtime.to_device_input(x, self.device))
        return runtime.features_to_numpy(maps)


class OnnxExtractor:
    """An onnxruntime session over the backbone exported to ``onnx_path`` (exported first if missing)."""

    name = "onnx"

    def __init__(self, backbone: Backbone, onnx_path: str | Path, threads: int | None = None):
        import onnxruntime as ort

        self.path = Path(onnx_path)
        if not self.path.exists():
            export_backbone_onnx(backbone, self.path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])

    def __call__(self, x: torch.Tensor) -> np.ndarray:
        (maps,) = self.session.run(None, {"image": x.detach().to("cpu", torch.float32).contiguous().numpy()})
        return maps


def export_backbone_onnx(backbone: Backbone, path: str | Path, opset: int = OPSET) -> Path:
    """The backbone's feature-map graph as ONNX with a free batch axis, written atomically (concurrent
    torchrun processes may export at once; each rename installs a complete file)."""
    size = backbone.preprocessing.input_size
    example = torch.zeros(1, backbone.preprocessing.channels, size, size)
    module = backbone.eval().to(device="cpu", memory_format=torch.contiguous_format)

    def write(fh) -> None:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the TorchScript-based exporter's deprecation notice
            torch.onnx.export(module, (example,), fh, dynamo=False, opset_version=opset,
                              input_names=["image"], output_names=["features"],
                              dynamic_axes={"image": {0: "batch"}, "features": {0: "batch"}})

    return atomic_write(path, write)


def onnxruntime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def check_extract_runtime(name: str) -> str:
    if name not in EXTRACT_RUNTIMES:
        raise ValueError(f"extraction runtime must be one of {', '.join(EXTRACT_RUNTIMES)}, not {name!r}")
    return name


def make_extractor(backbone: Backbone, requested: str, device: torch.device, precision: str,
                   onnx_path: Path, warn: Callable[[str], None]) -> Extractor:
    """The engine for ``requested`` (auto|torch|onnx) on ``device`` at ``precision``."""
    check_extract_runtime(requested)
    if requested == "onnx" and (device.type != "cpu" or precision != "fp32"):
        raise ValueError("--runtime onnx extracts in fp32 on the CPU; use torch for bf16 or cuda")
    use_onnx = requested == "onnx" or (
        requested == "auto" and device.type == "cpu" and precision == "fp32" and onnxruntime_available())
    if use_onnx:
        try:
            return OnnxExtractor(backbone, onnx_path)
        except Exception as exc:  # noqa: BLE001 - any exporter/runtime failure means: use torch instead
            if requested == "onnx":
                raise RuntimeError(f"ONNX export of backbone {backbone.spec.name} failed: {exc}") from exc
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            warn(f"onnxruntime unavailable for {backbone.spec.name} ({first_line}); extracting with torch")
    return TorchExtractor(backbone, device, precision)
