"""Fixtures for the serving tests: a tiny random model for export parity, the shared trained model for the API."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def tiny_bundle(head: str, with_ood: bool = True):
    """timm's test_efficientnet with random weights and a small head: fast enough to export in a test."""
    import torch

    from cxrnn.models.backbones import create_backbone
    from cxrnn.models.bundle import ModelBundle, build_network
    from cxrnn.models.ood import fit_ood_stats

    backbone = create_backbone("test_efficientnet", "none", seed=0)
    options = {"paper": {"lstm_units": 8, "dense": [16]}, "pool": {}}.get(head, {"hidden": 16, "dense": 8})
    torch.manual_seed(0)
    net, hw = build_network(backbone, head, 3, options)
    net.eval()
    extras = {}
    if with_ood:
        pooled = np.random.default_rng(0).normal(size=(40, backbone.spec.feature_channels))
        extras["ood"] = fit_ood_stats(pooled).to_extras()
    return ModelBundle(net=net, classes=["covid", "normal", "pneumonia"], preprocessing=backbone.preprocessing,
                       backbone_name=backbone.spec.name, weights_id="none", head_name=head, head_options=options,
                       feature_hw=hw, temperature=1.5, extras=extras)


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def jpeg_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).convert("RGB").save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="session")
def phantom_png(phantom_dir: Path) -> Path:
    return sorted((phantom_dir / "covid").glob("*.png"))[0]


@pytest.fixture(scope="session")
def served_model(trained_run) -> Path:
    return Path(trained_run.model_path)


@pytest.fixture(scope="session")
def make_tiny_bundle():
    return tiny_bundle


@pytest.fixture(scope="session")
def encode():
    """Encoders for test uploads: ``encode.png(array)``, ``encode.jpeg(array)``."""

    class Encoders:
        png = staticmethod(png_bytes)
        jpeg = staticmethod(jpeg_bytes)

    return Encoders
