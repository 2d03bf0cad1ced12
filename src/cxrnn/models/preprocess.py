"""Grey [0,1] images -> the backbone's input tensor, driven by the model's stored preprocessing."""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from cxrnn.models.backbones import Preprocessing


def to_input_tensor(images: Sequence[np.ndarray], prep: Preprocessing) -> torch.Tensor:
    """Resize each grey image to the square input (no crop, as the paper), replicate to 3 channels,
    normalise with the weights' mean/std. Returns (B, 3, S, S) float32."""
    batch = [_resized(image, prep) for image in images]
    x = torch.cat(batch).expand(-1, prep.channels, -1, -1)
    mean = torch.tensor(prep.mean[: prep.channels], dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(prep.std[: prep.channels], dtype=torch.float32).view(1, -1, 1, 1)
    return (x - mean) / std


def _resized(image: np.ndarray, prep: Preprocessing) -> torch.Tensor:
    size = prep.input_size
    mode = prep.interpolation if prep.interpolation in ("bilinear", "bicubic", "nearest") else "bilinear"
    t = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    if t.shape[-2:] != (size, size):
        t = F.interpolate(t, size=(size, size), mode=mode, antialias=mode != "nearest",
                          align_corners=False if mode != "nearest" else None)
    return t.clamp_(0.0, 1.0)


def resize_to_input(image: np.ndarray, prep: Preprocessing) -> np.ndarray:
    """The grey image at the model's input size, exactly as ``to_input_tensor`` resizes it (for caching)."""
    return _resized(image, prep)[0, 0].numpy()


def input_transform(prep: Preprocessing) -> tuple[Callable[[np.ndarray], np.ndarray], str]:
    """(picklable grey image -> input-size image, its tag for the decoded-image cache)."""
    return functools.partial(resize_to_input, prep=prep), f"{prep.input_size}:{prep.interpolation}"
