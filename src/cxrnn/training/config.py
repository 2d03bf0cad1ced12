"""Training configuration: a dataclass that round-trips through YAML; the CLI only fills it in.

Each field's ``metadata["help"]`` is its one-line description: ``cxrnn train`` builds one option per field
from it (``cxrnn.cli.options``), so a new field is a new command-line option without a second spelling.
``metadata["flag"]`` names a boolean's switch when it is not plain ``--name``; ``metadata["cli"] = False``
keeps a field YAML-only. ``metadata["bounds"]`` (a ``Bounds``) is a number's allowed range: ``validate()``
and the generated command-line option both check it, so the two can never disagree.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import math

import yaml

from cxrnn.audit.thresholds import DEFAULT_ALIGN_THRESHOLD, DEFAULT_THRESHOLD
from cxrnn.evaluation.bootstrap import DEFAULT_BOOTSTRAP
from cxrnn.utils.atomic import atomic_write_text

OPTIMIZERS = ("adamw", "adam", "rmsprop", "sgd")
SCHEDULES = ("constant", "exponential", "cosine")
PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True)
class Bounds:
    """A closed or open numeric range; ``None`` leaves a side unbounded. NaN and infinities are never inside."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __str__(self) -> str:
        left = f"{'>' if self.low_open else '>='} {self.low:g}" if self.low is not None else ""
        right = f"{'<' if self.high_open else '<='} {self.high:g}" if self.high is not None else ""
        if left and right:
            return (f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}"
                    f"{')' if self.high_open else ']'}")
        return left or right or "a number"

    def contains(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return not (self.high is not None and (value >= self.high if self.high_open else value > self.high))

    def check(self, name: str, value: Any) -> None:
        """Raise ``ValueError`` naming ``name`` when ``value`` is outside (the message the CLI shows too)."""
        if not self.contains(value):
            raise ValueError(f"{name} must be {self}, not {value!r}")


def at_least(low: float) -> Bounds:
    return Bounds(low=low)


def above(low: float) -> Bounds:
    return Bounds(low=low, low_open=True)


def within(low: float, high: float, *, low_open: bool = False, high_open: bool = False) -> Bounds:
    return Bounds(low, high, low_open, high_open)


def field_bounds(name: str) -> Bounds | None:
    """TrainConfig's range for field ``name``: for commands whose options mean the same as a training option."""
    return next(f for f in fields(TrainConfig) if f.name == name).metadata.get("bounds")


def option(default: Any = None, help: str = "", *, default_factory: Any = None, **metadata: Any) -> Any:
    """A dataclass field carrying its command-line help (and, optionally, ``flag``, ``cli=False`` or ``bounds``)."""
    meta = {"help": help, **metadata}
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    data: str = option("", "Dataset folder (ROOT/<class>/...) or CSV manifest.")
    backbone: str = option("efficientnet_lite0", "vgg19, densenet121, inception_v3, inception_resnet_v2, "
                                                 "efficientnet_lite0 or a timm name.")
    head: str = option("bilstm", "bilstm, lstm, gru, pool or paper.")
    weights: str = option("imagenet", "imagenet, none or a local state-dict file.")
    input_size: int = option(0, "Side of the square backbone input in pixels (0: the backbone's own, 224 for "
                                "the paper's); larger inputs give a finer feature sequence.", bounds=at_least(0))
    out: str = option("runs/train", "Run directory.")
    seed: int = option(0, "Random seed of the split, the head's initialisation and the batches.", bounds=at_least(0))
    test_size: float = option(0.2, "Share held out for testing.", bounds=within(0, 1, low_open=True, high_open=True))
    val_size: float = option(0.1, "Share of the non-test part held out for early stopping.",
                              bounds=within(0, 1, high_open=True))
    folds: int = option(0, "k-fold cross-validation on the non-test part when >= 2.", bounds=at_least(0))
    group_by: str | None = option(None, "Manifest column (patient_id, source) whose groups never straddle a split.")
    optimizer: str = option("adamw", ", ".join(OPTIMIZERS[:-1]) + f" or {OPTIMIZERS[-1]}.")
    lr: float = option(1e-3, "Learning rate (of the head, when fine-tuning).", bounds=above(0))
    lr_schedule: str = option("cosine", ", ".join(SCHEDULES[:-1]) + f" or {SCHEDULES[-1]}.")
    lr_decay: float = option(0.95, "Per-epoch factor of the exponential schedule.", bounds=within(0, 1, low_open=True))
    weight_decay: float = option(1e-4, "Weight decay of the optimizer.", bounds=at_least(0))
    epochs: int = option(40, "Most epochs to train.", bounds=at_least(1))
    batch_size: int = option(32, "Training batch size.", bounds=at_least(1))
    patience: int = option(10, "Epochs without a better validation loss before stopping early (0: never).",
                           bounds=at_least(0))
    finetune: bool = option(False, "Train end to end (with augmentation) instead of a head on frozen features.",
                            flag="--finetune/--frozen")
    freeze_rnn: bool = option(False, "Keep the paper head's LSTM at random init, as the seed did.")
    backbone_lr_scale: float = option(0.1, "With --finetune: the backbone's learning rate as a share of the head's.",
                                      bounds=within(0, 1))
    # Fine-tuning only: cached features of a frozen backbone are fixed, so they cannot be augmented.
    rotation: float = option(15.0, "With --finetune: degrees of train-time rotation.", bounds=within(0, 180))
    head_options: dict[str, Any] = option(help="Head keyword arguments (lstm_units, dense, hidden, ...).",
                                          default_factory=dict, cli=False)
    preset: str | None = option(None, "'paper': RMSprop, lr 2e-4*0.95^epoch, batch 16, 20 epochs, paper head.")
    cache_dir: str | None = option(None, "Feature cache folder (default ~/.cache/cxrnn/features).")
    feature_dtype: str = option("float32", "float32 or float16 feature store (half the disk and I/O).")
    extract_batch_size: int = option(16, "Batch size of the feature extraction.", bounds=at_least(1))
    extract_runtime: str = option("auto", "auto (onnxruntime for fp32 on the CPU, else torch), torch or onnx: "
                                          "what runs the frozen backbone.")
    strict: bool = option(False, "Stop at the first unreadable file.")
    device: str = option("cpu", "cpu or cuda; under torchrun each process uses its local GPU.")
    bootstrap: int = option(DEFAULT_BOOTSTRAP, "Bootstrap resamples for the test metrics' 95% intervals (0: none).",
                           bounds=at_least(0))
    coverage: float = option(0.9, "Target coverage of the prediction sets: each class's images have that class in "
                                  "their set at least this often (class-conditional conformal, fitted on the "
                                  "validation split).", bounds=within(0, 1, low_open=True, high_open=True))
    dedup: bool = option(True, "Keep exact and near-duplicate images on one side of every split.")
    near_duplicate_threshold: int = option(DEFAULT_THRESHOLD, "pHash bits (of 256) within which two images "
                                                              "count as copies.", bounds=within(0, 256))
    align_threshold: float = option(DEFAULT_ALIGN_THRESHOLD, "Band-pass NCC after alignment for shifted, cropped "
                                                             "or rotated copies (0: pHash only).", bounds=within(0, 1))
    leave_one_source_out: bool = option(False, "Also train on all sources but one and test on that one, for each.")
    precision: str = option("fp32", "fp32 or bf16 autocast for extraction, training and the saved model's default.")
    workers: int = option(0, "DataLoader processes decoding images (0: in process).", bounds=at_least(0))
    image_cache: str | None = option(None, "Folder caching decoded images at the input size (reused across runs).")
    allow_outside_paths: bool = option(False, "Accept manifest paths that resolve outside the manifest's folder.")

    def validate(self) -> "TrainConfig":
        for f in fields(self):
            if "bounds" in f.metadata:
                f.metadata["bounds"].check(f.name, getattr(self, f.name))
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, not {self.optimizer!r}")
        if self.lr_schedule not in SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {SCHEDULES}, not {self.lr_schedule!r}")
        if self.folds == 1:
            raise ValueError("folds must be 0 (no k-fold) or >= 2")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be fp32 or bf16, not {self.precision!r}")
        from cxrnn.features.extractors import EXTRACT_RUNTIMES  # here: importing it pulls in torch
        from cxrnn.models.backbones import check_input_size

        check_input_size(self.input_size)  # here, before the split and the cache, not only at the backbone
        if self.extract_runtime not in EXTRACT_RUNTIMES:
            raise ValueError(f"extract_runtime must be one of {', '.join(EXTRACT_RUNTIMES)}, not {self.extract_runtime!r}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_yaml(self, path: str | Path | None = None) -> str:
        """The YAML text; written atomically to ``path`` when given (a reader never sees half a config)."""
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            atomic_write_text(path, text)
        return text

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown config keys: {', '.join(unknown)}")
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "TrainConfig":
        values = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{path}: a config file is a YAML mapping of option: value")
        return cls.from_dict(values)


# What the seed code used (shared/reference/paper-facts.md), minus its defects: the LSTM trains
# (pass freeze_rnn to reproduce it), folds come from the non-test part and never warm-start.
PRESETS: dict[str, dict[str, Any]] = {
    "paper": dict(
        head="paper",
        optimizer="rmsprop",
        lr=2e-4,
        lr_schedule="exponential",
        lr_decay=0.95,
        weight_decay=0.0,
        batch_size=16,
        epochs=20,
        patience=0,  # the seed trained all 20 epochs and kept the best weights by validation loss
        rotation=15.0,
        test_size=0.2,
    ),
}


def resolve_config(
    cli_values: dict[str, Any], config_file: str | Path | None = None, preset: str | None = None
) -> TrainConfig:
    """defaults < preset < config file < explicit command-line values (None means 'not given')."""
    file_values: dict[str, Any] = {}
    if config_file is not None:
        file_values = TrainConfig.from_yaml(config_file).to_dict()
        # A file written by to_yaml lists every field; only those that differ from the defaults may
        # override the preset, or every saved config would undo the preset it was trained with.
        file_values = {k: v for k, v in file_values.items() if v != getattr(TrainConfig(), k)}
    preset = preset or cli_values.get("preset") or file_values.get("preset")
    values: dict[str, Any] = {}
    if preset:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}: use one of {', '.join(PRESETS)}")
        values.update(PRESETS[preset])
        values["preset"] = preset
    values.update(file_values)
    values.update({k: v for k, v in cli_values.items() if v is not None})
    return TrainConfig.from_dict(values).validate()
