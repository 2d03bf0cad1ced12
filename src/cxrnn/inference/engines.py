"""The two engines that run a graph: PyTorch and ONNX Runtime. "Runtime" in cxrnn means this choice only.

Both take a batch of preprocessed input tensors and return a dict of named float32 numpy arrays, so a
caller (the predictor around the inference graph, the feature extractor around a backbone) does not
care which one runs. The torch engine applies the device, precision and channels_last layout of
``cxrnn.inference.device``; the ONNX engine runs an exported file in fp32 on the CPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
import torch
from torch import nn

from cxrnn.inference.device import (autocast, check_precision, prepare_module, resolve_device,
                                    to_device_input, to_float32_numpy)

RUNTIMES = ("torch", "onnx")


class Engine(Protocol):
    name: str  # "torch" or "onnx"
    output_names: tuple[str, ...]

    def __call__(self, x: torch.Tensor) -> dict[str, np.ndarray]: ...


def check_runtime(runtime: str) -> str:
    """``runtime`` if it names an engine, so a typo fails before a model is loaded or exported."""
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}: use one of {', '.join(RUNTIMES)}")
    return runtime


class TorchEngine:
    """``module`` in eval mode on ``device``, in channels_last, under ``precision`` (bf16: autocast).

    The module is prepared in place (moved and re-laid out), not copied, so a large backbone is held once.
    """

    name = "torch"

    def __init__(self, module: nn.Module, output_names: Sequence[str], device: str | torch.device = "cpu",
                 precision: str = "fp32"):
        self.output_names = tuple(output_names)
        self.device = resolve_device(device)
        self.precision = check_precision(precision)
        self.module = prepare_module(module.eval(), self.device)

    def __call__(self, x: torch.Tensor) -> dict[str, np.ndarray]:
        with torch.inference_mode(), autocast(self.device, self.precision):
            outs = self.module(to_device_input(x, self.device))
        if isinstance(outs, torch.Tensor):  # a one-output graph (a backbone) returns its tensor bare
            outs = (outs,)
        return {name: to_float32_numpy(out) for name, out in zip(self.output_names, outs)}


class OnnxEngine:
    """An onnxruntime CPU session over an exported file.

    ``threads=None`` leaves onnxruntime's own default; the extractor passes torch's thread count so that
    ``--threads``/``OMP_NUM_THREADS`` limits hold for both engines.
    """

    name = "onnx"

    def __init__(self, onnx_path: str | Path, output_names: Sequence[str], threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.output_names = tuple(output_names)
        self.session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        self._input = self.session.get_inputs()[0].name  # the file says what its input is called

    def __call__(self, x: torch.Tensor) -> dict[str, np.ndarray]:
        outs = self.session.run(list(self.output_names), {self._input: to_float32_numpy(x)})
        return dict(zip(self.output_names, outs))
