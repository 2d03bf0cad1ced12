"""One inference graph for every engine: input tensor -> calibrated probabilities, logits, OOD score.

PyTorch, ONNX Runtime and TorchScript all run this same module (the exports are made from it), so the
temperature, the softmax and the out-of-distribution distance are computed identically everywhere.
"""

from __future__ import annotations

import torch
from torch import nn

from cxrnn.models.bundle import ModelBundle
from cxrnn.models.ood import MahalanobisScore, OodStats

OUTPUT_NAMES = ("probabilities", "logits", "ood_score")


class InferenceModule(nn.Module):
    """A bundle's network with its temperature and OOD gate attached, so one forward pass gives everything
    a prediction reports (the backbone's map feeds both the head and the gate)."""

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
