"""The whole CNN->RNN network: backbone feature map -> sequence head -> class logits."""

from __future__ import annotations

import torch
from torch import nn

from cxrnn.models.backbones import Backbone


class CxrNet(nn.Module):
    def __init__(self, backbone: Backbone, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def freeze_backbone(self) -> "CxrNet":
        self.backbone.requires_grad_(False)
        return self
