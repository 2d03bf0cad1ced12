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


class _NotAModel(Exception):
    """Why a file is not a cxrnn model file (becomes the reason in one ValueError line)."""


# What every readable model file holds: key -> type (checked before anything is built from it).
_REQUIRED = {"classes": list, "backbone": dict, "preprocessing": dict, "head": dict, "feature_hw": list,
             "state_dict": dict}


def load_bundle(path: str | Path, device: str | torch.device = "cpu") -> ModelBundle:
    """Load ``model.pt``; a file that is not a whole, matching cxrnn model file raises one ValueError line,
    ``PATH: not a cxrnn model file (reason)``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: model file not found")
    try:
        payload = _read_payload(path)
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise _NotAModel("no cxrnn-model format tag")
        version = _format_version(payload)
        if version > FORMAT_VERSION:
            raise ValueError(f"{path}: made by a newer cxrnn (format {version}, this cxrnn reads up to "
                             f"{FORMAT_VERSION})")
        return _bundle_from(payload, version, device)
    except _NotAModel as exc:
        # from None: the chained torch text advises weights_only=False, which a user must never do
        raise ValueError(f"{path}: not a cxrnn model file ({exc})") from None


def _read_payload(path: Path) -> Any:
    import pickle
    import warnings

    try:
        with warnings.catch_warnings():
            # torch warns about a foreign pickle protocol before refusing it: the refusal is the message
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's text is not shown: it advises weights_only=False, which would run whatever the file holds
        if "global" in str(exc).lower():  # the weights-only unpickler met a class or function to import
            raise _NotAModel("it holds Python objects besides tensors and plain values; it was not loaded") from None
        raise _NotAModel("not a readable PyTorch file (UnpicklingError)") from None
    except MemoryError:
        raise
    except OSError as exc:  # the file is there but unreadable: say so, not that it is the wrong kind
        raise ValueError(f"{path}: model file cannot be read ({exc.strerror or type(exc).__name__})") from None
    except Exception as exc:  # torch reports random bytes and truncation as RuntimeError, EOFError, ...
        raise _NotAModel(f"not a readable PyTorch file ({type(exc).__name__})") from None


def _format_version(payload: dict[str, Any]) -> int:
    value = payload.get("format_version", 0)
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise _NotAModel(f"format_version {_short(value)} is not a number")
    try:
        return int(value)
    except (ValueError, OverflowError):
        raise _NotAModel(f"format_version {_short(value)} is not a number") from None


def _short(value: Any) -> str:
    text = repr(value).replace("\n", " ")
    return text if len(text) <= 40 else text[:37] + "..."


def _bundle_from(payload: dict[str, Any], version: int, device: str | torch.device) -> ModelBundle:
    missing = [k for k in _REQUIRED if k not in payload]
    if missing:
        raise _NotAModel(f"missing {', '.join(missing)}")
    for key, kind in _REQUIRED.items():
        if not isinstance(payload[key], kind):
            raise _NotAModel(f"{key} is a {type(payload[key]).__name__}, not a {kind.__name__}")
    for key, sub in (("backbone", ("name", "weights")), ("head", ("name", "options"))):
        lacking = [s for s in sub if s not in payload[key]]
        if lacking:
            raise _NotAModel(f"{key} lacks {', '.join(lacking)}")
    classes = payload["classes"]
    if not classes or not all(isinstance(c, str) for c in classes):
        raise _NotAModel("classes is not a list of class names")
    hw = payload["feature_hw"]
    if len(hw) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in hw):
        raise _NotAModel(f"feature_hw {_short(hw)} is not two positive integers")
    if not isinstance(payload["head"]["options"], dict):
        raise _NotAModel("head options are not a mapping")
    import timm

    try:
        spec = get_spec(str(payload["backbone"]["name"]))
        prep = Preprocessing.from_dict(payload["preprocessing"])
        backbone = Backbone(spec, timm.create_model(spec.timm_name, pretrained=False), payload["backbone"]["weights"])
        backbone.preprocessing = prep
        head_options = dict(payload["head"]["options"])
        if version < 2 and payload["head"]["name"] in ("lstm", "gru", "bilstm"):
            head_options.setdefault("summary", "last_mean")
        head = create_head(str(payload["head"]["name"]), spec.feature_channels, hw[0] * hw[1], len(classes),
                           **head_options)
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as exc:
        raise _NotAModel(f"cannot build its network: {_one_line(exc)}") from None
    net = CxrNet(backbone, head)
    _check_weights(net, payload["state_dict"])
    try:
        net.load_state_dict(payload["state_dict"])
    except RuntimeError as exc:
        raise _NotAModel(f"its weights do not load: {_one_line(exc)}") from None
    net.eval().to(device)
    return ModelBundle(
        net=net,
        classes=list(classes),
        preprocessing=prep,
        backbone_name=payload["backbone"]["name"],
        weights_id=payload["backbone"]["weights"],
        head_name=payload["head"]["name"],
        head_options=head_options,
        feature_hw=(int(hw[0]), int(hw[1])),
        config=_mapping(payload, "config"),
        temperature=_temperature(payload),
        metrics=_mapping(payload, "metrics"),
        extras=_mapping(payload, "extras"),
        created=str(payload.get("created", "")),
        format_version=version,
        notes=_missing_for(version, _mapping(payload, "metrics")),
    )


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    text = text if len(text) <= 160 else text[:157] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _check_weights(net: CxrNet, state: dict[str, Any]) -> None:
    """Compare names and shapes first: load_state_dict's own error is many lines of every key."""
    expected = net.state_dict()
    bad_type = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [k for k in expected if k in state and k not in bad_type
              and tuple(state[k].shape) != tuple(expected[k].shape)]
    if not (bad_type or missing or unexpected or shapes):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {str(unexpected[0])[:60]})")
    if shapes:
        k = shapes[0]
        parts.append(f"{len(shapes)} of another shape (e.g. {k}: {list(state[k].shape)} in the file, "
                     f"{list(expected[k].shape)} expected)")
    if bad_type:
        parts.append(f"{len(bad_type)} not tensors (e.g. {str(bad_type[0])[:60]})")
    raise _NotAModel("its weights do not match its backbone and head: " + "; ".join(parts))


def _mapping(payload: dict[str, Any], key: str) -> dict[str, Any]:
    value = payload.get(key, {})
    if not isinstance(value, dict):
        raise _NotAModel(f"{key} is a {type(value).__name__}, not a mapping")
    return dict(value)


def _temperature(payload: dict[str, Any]) -> float:
    value = payload.get("temperature", 1.0)
    try:
        t = float(value)
    except (TypeError, ValueError):
        raise _NotAModel(f"temperature {_short(value)} is not a number") from None
    if not t > 0 or t == float("inf"):
        raise _NotAModel(f"temperature {_short(value)} is not a positive number")
    return t


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
