"""Training configuration: a dataclass that round-trips through YAML; the CLI only fills it in."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

OPTIMIZERS = ("adamw", "adam", "rmsprop", "sgd")
SCHEDULES = ("constant", "exponential", "cosine")


@dataclass
class TrainConfig:
    data: str = ""
    backbone: str = "efficientnet_lite0"
    head: str = "bilstm"
    weights: str = "imagenet"
    out: str = "runs/train"
    seed: int = 0
    test_size: float = 0.2
    val_size: float = 0.1  # share of the non-test part held out for early stopping
    folds: int = 0  # k-fold on the non-test part when >= 2
    group_by: str | None = None  # manifest column (patient_id, source) whose groups never straddle a split
    optimizer: str = "adamw"
    lr: float = 1e-3
    lr_schedule: str = "cosine"
    lr_decay: float = 0.95  # per-epoch factor of the exponential schedule
    weight_decay: float = 1e-4
    epochs: int = 40
    batch_size: int = 32
    patience: int = 10  # epochs without a better validation loss before stopping; 0 = never stop early
    finetune: bool = False
    freeze_rnn: bool = False
    backbone_lr_scale: float = 0.1  # fine-tuning only: the backbone's lr as a share of the head's
    rotation: float = 15.0  # degrees of train-time rotation, fine-tuning only (cached features are fixed)
    head_options: dict[str, Any] = field(default_factory=dict)
    preset: str | None = None
    cache_dir: str | None = None
    feature_dtype: str = "float32"
    extract_batch_size: int = 16
    extract_runtime: str = "auto"  # auto, torch or onnx: what runs the frozen backbone (cxrnn.features.extractors)
    strict: bool = False
    device: str = "cpu"
    bootstrap: int = 1000  # bootstrap resamples for the test metrics' 95% intervals (0: none)
    dedup: bool = True  # keep exact and near-duplicate images on one side of every split
    near_duplicate_threshold: int = 12  # pHash bits (of 256) within which two images count as copies
    align_threshold: float = 0.9  # band-pass NCC after alignment for shifted/cropped copies (0: pHash only)
    leave_one_source_out: bool = False  # also train on all sources but one and test on that one, for each
    precision: str = "fp32"  # fp32 or bf16 (autocast) for extraction, training and the saved model's default
    workers: int = 0  # DataLoader processes decoding images
    image_cache: str | None = None  # folder for decoded images resized to the input size (reused across runs)

    def validate(self) -> "TrainConfig":
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, not {self.optimizer!r}")
        if self.lr_schedule not in SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {SCHEDULES}, not {self.lr_schedule!r}")
        if not 0 < self.test_size < 1:
            raise ValueError("test_size must be between 0 and 1")
        if not 0 <= self.val_size < 1:
            raise ValueError("val_size must be in [0, 1)")
        if self.folds == 1 or self.folds < 0:
            raise ValueError("folds must be 0 (no k-fold) or >= 2")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be fp32 or bf16, not {self.precision!r}")
        from cxrnn.features.extractors import EXTRACT_RUNTIMES  # here: importing it pulls in torch

        if self.extract_runtime not in EXTRACT_RUNTIMES:
            raise ValueError(f"extract_runtime must be one of {', '.join(EXTRACT_RUNTIMES)}, not {self.extract_runtime!r}")
        if not 0 <= self.backbone_lr_scale <= 1:
            raise ValueError("backbone_lr_scale must be in [0, 1]")
        if not 0 <= self.align_threshold <= 1:
            raise ValueError("align_threshold must be in [0, 1] (0 turns the alignment pass off)")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("epochs, batch_size and lr must be positive")
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_yaml(self, path: str | Path | None = None) -> str:
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            Path(path).write_text(text)
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
