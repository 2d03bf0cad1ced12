"""Deletion and insertion curves (Petsiuk, Das and Saenko, "RISE", BMVC 2018): is a map faithful to the model?

Pixels are removed (deletion: replaced by black) or revealed (insertion: a blurred copy is sharpened) in the
order of the map, most important first, and the explained class's probability is followed over
``steps`` equal fractions of the image. The area under the curve (trapezoid over the removed fraction in
[0, 1]) judges the map by the model rather than by the lesion: a low deletion AUC and a high insertion AUC
mean the map ranks first the pixels the model uses. Random orders are the references every map must beat: one
of single pixels and one of feature-map cells (see ``random_aucs``).

Everything happens at the model's input size (S x S): the map is resized to it and the curve's inputs are
model inputs, so one curve costs ``steps + 1`` whole-network passes per image and direction.
"""

from __future__ import annotations

import numpy as np
import torch

from cxrnn.explain.attribution import black_input, gaussian_blur, grid_to_input
from cxrnn.explain.cam import resize_map
from cxrnn.explain.registry import CURVE_STEPS
from cxrnn.models.network import CxrNet

# Petsiuk et al.'s insertion canvas: a Gaussian blur (their kernel 11, sigma 5 at 224 px), scaled to the input.
BLUR_SIGMA = 5 / 224


def pixel_order(saliency: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Flat pixel indices from the most to the least salient; ties (flat zero regions of a map) in random order."""
    flat = np.asarray(saliency, dtype=np.float64).ravel()
    return np.lexsort((rng.random(flat.size), -flat))


def auc(curve: np.ndarray) -> float:
    """Area under a curve sampled at equal fractions of [0, 1]."""
    return float(np.trapezoid(curve, dx=1.0 / (len(curve) - 1)))


class DeletionInsertion:
    """Deletion and insertion curves of maps for one network; ``batch_size`` bounds the passes run at once."""

    def __init__(self, net: CxrNet, preprocessing: object, temperature: float = 1.0, steps: int = CURVE_STEPS,
                 batch_size: int = 32):
        if steps < 2:
            raise ValueError("a deletion curve needs at least 2 steps")
        self.net = net
        self.preprocessing = preprocessing
        self.temperature = float(temperature)
        self.steps = steps
        self.batch_size = batch_size

    def curves(self, x: torch.Tensor, saliency: np.ndarray, target: int, seed: int = 0) -> dict[str, np.ndarray]:
        """{"deletion", "insertion"}: the target's probability at 0, 1/steps, ..., 1 of the pixels, for one
        normalised input ``x`` (1, 3, S, S) and its map (any size; resized to S x S)."""
        size = x.shape[-1]
        order = pixel_order(resize_map(np.asarray(saliency, np.float32), (size, size)), np.random.default_rng(seed))
        counts = np.round(np.linspace(0, size * size, self.steps + 1)).astype(np.int64)
        rank = np.empty(size * size, dtype=np.int64)
        rank[order] = np.arange(size * size)
        # masks[k] marks the counts[k] most salient pixels
        masks = torch.from_numpy(rank[None, :] < counts[:, None]).view(-1, 1, size, size).to(x.device, x.dtype)
        black = black_input(x, self.preprocessing)
        blurred = gaussian_blur(x[0], BLUR_SIGMA * size)[None]
        deletion = x * (1 - masks) + black * masks
        insertion = blurred * (1 - masks) + x * masks
        probs = self._probabilities(torch.cat([deletion, insertion]), target)
        return {"deletion": probs[: self.steps + 1], "insertion": probs[self.steps + 1 :]}

    def _probabilities(self, inputs: torch.Tensor, target: int) -> np.ndarray:
        out = []
        with torch.inference_mode():
            for start in range(0, len(inputs), self.batch_size):
                logits = self.net(inputs[start : start + self.batch_size])
                out.append(torch.softmax(logits / self.temperature, dim=1)[:, target].float().cpu())
        return torch.cat(out).numpy()

    def aucs(self, x: torch.Tensor, saliency: np.ndarray, target: int, seed: int = 0) -> dict[str, float]:
        """{"deletion_auc", "insertion_auc"} of one map."""
        curves = self.curves(x, saliency, target, seed)
        return {"deletion_auc": auc(curves["deletion"]), "insertion_auc": auc(curves["insertion"])}

    def random_aucs(self, x: torch.Tensor, target: int, seed: int = 0,
                    cells: tuple[int, int] | None = None) -> dict[str, float]:
        """The same for a random order: of pixels (a map of uniform noise at the input size) or, with ``cells``
        (H, W), of feature-map cells (noise on that grid, enlarged as the sequence maps are).

        The cell order removes whole smooth blobs, as every map here does, where the pixel order scatters
        single pixels; a model can react to the scattered noise itself, so only the cell order tells whether
        a map's *choice* of regions matters more than the shape of what it removes.
        """
        size = x.shape[-1]
        rng = np.random.default_rng(seed + 1)
        if cells is None:
            noise = rng.random((size, size)).astype(np.float32)
        else:
            noise = grid_to_input(torch.from_numpy(rng.random((1, *cells)).astype(np.float32)), size)[0].numpy()
        return self.aucs(x, noise, target, seed)
