"""The saved model: one ``model.pt`` with weights, class names, backbone, preprocessing and config.

It holds only tensors and plain Python values, so it loads with ``torch.load(weights_only=True)``
and a model file cannot run code. Like torchxrayvision, the preprocessing travels with the weights:
predict, explain and serve never re-derive it.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cxrnn import __version__
from cxrnn.utils.atomic import atomic_write
from cxrnn.models.backbones import Backbone, BackboneSpec, Preprocessing, get_spec
from cxrnn.models.heads import RecurrentHead, create_head
from cxrnn.models.network import CxrNet

FORMAT = "cxrnn-model"
# 2: recurrent heads store their summary (1 meant "last_mean")
# 3: ``metrics`` holds what training measured on the test split for the model card: the bootstrap
#    intervals (``ci``), the ECE after temperature scaling (``ece``) and the ``calibration`` block
FORMAT_VERSION = 3
# The test-split measurements a run stores in its model file (the rest stays in metrics.json).
BUNDLE_METRICS = ("n", "accuracy", "macro_f1", "macro_auc", "ci", "ece", "calibration")


@dataclass
class ModelBundle:
    net: CxrNet
    classes: list[str]
    preprocessing: Preprocessing
    backbone_name: str
    weights_id: str
    head_name: str
    head_options: dict[str, Any]
    feature_hw: tuple[int, int]
    config: dict[str, Any] = field(default_factory=dict)
    temperature: float = 1.0
    metrics: dict[str, Any] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    format_version: int = FORMAT_VERSION
    notes: list[str] = field(default_factory=list)  # what an older model file does not hold

    @property
    def target_layer(self) -> str:
        return self.net.backbone.spec.target_layer

    def describe(self) -> str:
        return f"{self.backbone_name}+{self.head_name} ({', '.join(self.classes)})"


def paper_head_options(spec: BackboneSpec, options: dict[str, Any], freeze_rnn: bool) -> dict[str, Any]:
    """The seed code's head sizes for ``spec`` unless ``options`` says otherwise."""
    options = dict(options)
    options.setdefault("lstm_units", spec.paper_head.lstm_units)
    options.setdefault("dense", list(spec.paper_head.dense))
    options.setdefault("freeze_rnn", freeze_rnn)
    return options


def build_network(
    backbone: Backbone, head_name: str, num_classes: int, head_options: dict[str, Any]
) -> tuple[CxrNet, tuple[int, int]]:
    hw = backbone.spec.feature_hw(backbone.preprocessing.input_size)
    head = create_head(head_name, backbone.spec.feature_channels, hw[0] * hw[1], num_classes, **head_options)
    return CxrNet(backbone, head), hw


def save_bundle(bundle: ModelBundle, path: str | Path) -> Path:
    path = Path(path)
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "cxrnn_version": __version__,
        "created": bundle.created or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "classes": list(bundle.classes),
        "backbone": {
            "name": bundle.backbone_name,
            "timm_name": bundle.net.backbone.spec.timm_name,
            "weights": bundle.weights_id,
            "target_layer": bundle.net.backbone.spec.target_layer,
        },
        "preprocessing": bundle.preprocessing.to_dict(),
        "head": {"name": bundle.head_name, "options": _plain(_resolved_head_options(bundle))},
        "feature_hw": list(bundle.feature_hw),
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in bundle.net.state_dict().items()},
        "config": _plain(bundle.config),
        "temperature": float(bundle.temperature),
        "metrics": _plain(bundle.metrics),
        "extras": _plain(bundle.extras),
    }
    return atomic_write(path, lambda fh: torch.save(payload, fh))


def _resolved_head_options(bundle: ModelBundle) -> dict[str, Any]:
    # Defaults change between versions; the file records what this network was built with.
    options = dict(bundle.head_options)
    if isinstance(bundle.net.head, RecurrentHead):
        options.setdefault("summary", bundle.net.head.summary)
    return options


def load_bundle(path: str | Path, device: str | torch.device = "cpu") -> ModelBundle:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: model file not found")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path}: not a cxrnn model file ({type(exc).__name__}: {exc})") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path}: not a cxrnn model file")
    version = int(payload.get("format_version", 0))
    if version > FORMAT_VERSION:
        raise ValueError(f"{path}: made by a newer cxrnn (format {payload['format_version']})")
    import timm

    spec = get_spec(payload["backbone"]["name"])
    prep = Preprocessing.from_dict(payload["preprocessing"])
    backbone = Backbone(spec, timm.create_model(spec.timm_name, pretrained=False), payload["backbone"]["weights"])
    backbone.preprocessing = prep
    hw = tuple(payload["feature_hw"])
    head_options = dict(payload["head"]["options"])
    if version < 2 and payload["head"]["name"] in ("lstm", "gru", "bilstm"):
        head_options.setdefault("summary", "last_mean")
    head = create_head(
        payload["head"]["name"],
        spec.feature_channels,
        hw[0] * hw[1],
        len(payload["classes"]),
        **head_options,
    )
    net = CxrNet(backbone, head)
    net.load_state_dict(payload["state_dict"])
    net.eval().to(device)
    return ModelBundle(
        net=net,
        classes=list(payload["classes"]),
        preprocessing=prep,
        backbone_name=payload["backbone"]["name"],
        weights_id=payload["backbone"]["weights"],
        head_name=payload["head"]["name"],
        head_options=head_options,
        feature_hw=(int(hw[0]), int(hw[1])),
        config=dict(payload.get("config", {})),
        temperature=float(payload.get("temperature", 1.0)),
        metrics=dict(payload.get("metrics", {})),
        extras=dict(payload.get("extras", {})),
        created=str(payload.get("created", "")),
        format_version=version,
        notes=_missing_for(version, dict(payload.get("metrics", {}))),
    )


def _missing_for(version: int, metrics: dict[str, Any]) -> list[str]:
    """Plain-language notes on what a model file lacks (shown on the model card)."""
    notes = []
    if "ci" not in metrics:
        why = (f"model file format {version} predates stored intervals" if version < 3
               else "the run was trained with --bootstrap 0")
        notes.append(f"no bootstrap interval stored ({why}): the accuracy interval shown is a Wilson score "
                     "interval computed from n and accuracy")
    if "ece" not in metrics:
        notes.append(f"no calibration error (ECE) stored (model file format {version} predates it): "
                     "see the run's metrics.json")
    return notes


def _plain(value: Any) -> Any:
    """Recursively turn numpy scalars/arrays, tuples and Paths into types weights_only=True accepts."""
    import numpy as np

    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value.copy())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return value
