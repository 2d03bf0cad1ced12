"""One inference graph for every runtime: input tensor -> calibrated probabilities, logits, OOD score.

PyTorch, ONNX Runtime and TorchScript all run this same module (the exports are made from it), so the
temperature, the softmax and the out-of-distribution distance are computed identically everywhere.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn

from cxrnn.models.bundle import ModelBundle
from cxrnn.models.ood import MahalanobisScore, OodStats

OUTPUT_NAMES = ("probabilities", "logits", "ood_score")
RUNTIMES = ("torch", "onnx")


class InferenceModule(nn.Module):
    def __init__(self, bundle: ModelBundle):
        super().__init__()
        self.net = bundle.net
        self.register_buffer("temperature", torch.tensor(float(bundle.temperature)))
        self.ood = MahalanobisScore(OodStats.from_extras(bundle.extras), bundle.net.backbone.spec.feature_channels)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        fmap = self.net.backbone(x)
        logits = self.net.head(fmap)
        probs = torch.softmax(logits / self.temperature, dim=1)
        return probs, logits, self.ood(fmap.mean(dim=(2, 3)))


class Engine(Protocol):
    name: str

    def __call__(self, x: torch.Tensor) -> dict[str, np.ndarray]: ...


class TorchEngine:
    name = "torch"

    def __init__(self, bundle: ModelBundle):
        self.module = InferenceModule(bundle).eval()

    def __call__(self, x: torch.Tensor) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            outs = self.module(x)
        return {k: v.numpy() for k, v in zip(OUTPUT_NAMES, outs)}


class OnnxEngine:
    """onnxruntime session over an exported model (made on the fly into a temp dir if only a bundle is given)."""

    name = "onnx"

    def __init__(self, onnx_path: str | Path | None = None, bundle: ModelBundle | None = None, threads: int | None = None):
        import onnxruntime as ort

        self._tmp = None
        if onnx_path is None:
            if bundle is None:
                raise ValueError("OnnxEngine needs an ONNX file or a model bundle to export")
            from cxrnn.inference.export import export_onnx

            self._tmp = tempfile.TemporaryDirectory(prefix="cxrnn-onnx-")
            onnx_path = export_onnx(bundle, Path(self._tmp.name) / "model.onnx")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.path = Path(onnx_path)
        self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])

    def __call__(self, x: torch.Tensor) -> dict[str, np.ndarray]:
        outs = self.session.run(list(OUTPUT_NAMES), {"image": x.numpy()})
        return dict(zip(OUTPUT_NAMES, outs))


def make_engine(bundle: ModelBundle, runtime: str = "torch") -> Engine:
    if runtime == "torch":
        return TorchEngine(bundle)
    if runtime == "onnx":
        return OnnxEngine(bundle=bundle)
    raise ValueError(f"unknown runtime {runtime!r}: use one of {', '.join(RUNTIMES)}")
