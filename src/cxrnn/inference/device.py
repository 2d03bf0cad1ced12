"""Where and how a torch network runs: device (cpu|cuda), precision (fp32|bf16), memory layout.

One place decides these so extraction, training, prediction and serving behave the same (the torch engine
in ``cxrnn.inference.engines`` and the training loops use these helpers). bf16 uses autocast (weights stay
fp32, convolutions and matmuls run in bf16: AMX/AVX512-BF16 on recent Intel CPUs, tensor cores on GPUs);
fp32 runs as is. channels_last is applied to every backbone because oneDNN's and cuDNN's fastest
convolution kernels want NHWC (measured in benchmarks/inference.py).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import nn

PRECISIONS = ("fp32", "bf16")
DEVICES = ("cpu", "cuda")


def check_precision(precision: str) -> str:
    """``precision`` if known: a typo must fail before minutes of extraction, not after."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    return precision


def resolve_device(device: str | torch.device | None) -> torch.device:
    """A torch.device; ``cuda`` on a machine without a usable GPU is a clear error, not a crash later."""
    if isinstance(device, torch.device):
        return device
    name = (device or "cpu").strip().lower()
    kind = name.split(":")[0]
    if kind not in DEVICES:
        raise ValueError(f"device must be cpu or cuda (optionally cuda:N), not {device!r}")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA GPU is available to this PyTorch build; use --device cpu")
    return torch.device(name)


def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 arithmetic (AVX512-BF16 or AMX); elsewhere bf16 is emulated and slow."""
    flags = _cpu_flags()
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_name() -> str:
    """The CPU model, for benchmark records: speed numbers mean little without the machine."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


@contextlib.contextmanager
def autocast(device: torch.device | str, precision: str) -> Iterator[None]:
    """bf16 through autocast rather than cast weights: weights and reductions stay fp32, which keeps bf16
    predictions close to fp32 ones; fp32 enters no context at all."""
    device = resolve_device(device)
    if check_precision(precision) == "bf16":
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            yield
    else:
        yield


def prepare_module(module: nn.Module, device: torch.device | str) -> nn.Module:
    """Move to the device in channels_last layout (4-D weights only; LSTM/Linear weights are untouched), in
    place: the caller's module is the one that runs, no second copy of the weights is held."""
    device = resolve_device(device)
    return module.to(device=device, memory_format=torch.channels_last)


def to_device_input(x: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``x`` on the device in the layout ``prepare_module`` gave the weights (a mismatch costs a reorder per layer)."""
    device = resolve_device(device)
    return x.to(device=device, non_blocking=True).contiguous(memory_format=torch.channels_last)


def to_float32_numpy(t: torch.Tensor) -> np.ndarray:
    """Float32 numpy on the CPU whatever device and precision produced ``t``: bf16 has no numpy dtype, and
    engines must hand callers the same dtype from torch and onnxruntime."""
    return t.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()
