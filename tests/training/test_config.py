from __future__ import annotations

from dataclasses import fields

import pytest

from cxrnn.training.config import PRESETS, TrainConfig, resolve_config


def test_align_threshold_default_is_the_audit_default() -> None:
    from cxrnn.audit.thresholds import DEFAULT_ALIGN_THRESHOLD
    from cxrnn.training.config import TrainConfig

    assert TrainConfig().align_threshold == DEFAULT_ALIGN_THRESHOLD


def test_the_other_library_defaults_are_the_libraries_constants() -> None:
    from cxrnn.audit.thresholds import DEFAULT_THRESHOLD
    from cxrnn.evaluation.bootstrap import DEFAULT_BOOTSTRAP

    assert TrainConfig().near_duplicate_threshold == DEFAULT_THRESHOLD
    assert TrainConfig().bootstrap == DEFAULT_BOOTSTRAP


def test_every_field_carries_its_command_line_help() -> None:
    for f in fields(TrainConfig):
        assert f.metadata.get("help", "").strip(), f"TrainConfig.{f.name} has no help text"


def test_yaml_round_trip_keeps_every_option(tmp_path) -> None:
    cfg = TrainConfig(data="d", backbone="vgg19", head="paper", folds=5, lr=3e-4, head_options={"lstm_units": 64},
                      group_by="patient_id", freeze_rnn=True)
    path = tmp_path / "config.yaml"
    assert cfg.to_yaml(path) == path.read_text()
    assert TrainConfig.from_yaml(path) == cfg
    assert list(tmp_path.iterdir()) == [path]  # written through a temp file that is renamed, none left behind


def test_precedence_defaults_preset_file_cli(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    TrainConfig(data="from-file", epochs=7).to_yaml(path)
    cfg = resolve_config({"data": None, "batch_size": 8, "epochs": None}, config_file=path, preset="paper")
    assert cfg.data == "from-file"  # file beats default
    assert cfg.epochs == 7  # file beats preset
    assert cfg.batch_size == 8  # command line beats preset
    assert cfg.optimizer == "rmsprop" and cfg.lr == 2e-4 and cfg.lr_schedule == "exponential"
    assert cfg.head == "paper" and cfg.preset == "paper"


def test_paper_preset_is_the_seed_protocol() -> None:
    p = PRESETS["paper"]
    assert (p["optimizer"], p["lr"], p["lr_decay"], p["batch_size"], p["epochs"]) == ("rmsprop", 2e-4, 0.95, 16, 20)


@pytest.mark.parametrize("bad", [{"optimizer": "lion"}, {"folds": 1}, {"test_size": 1.5}, {"lr_schedule": "step"},
                                 {"extract_runtime": "tensorrt"}])
def test_invalid_values_are_rejected(bad) -> None:
    with pytest.raises(ValueError):
        resolve_config({"data": "x", **bad})


def test_unknown_keys_in_a_config_file_are_named(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("data: x\nlearning_rate: 0.1\n")
    with pytest.raises(ValueError, match="learning_rate"):
        TrainConfig.from_yaml(path)


@pytest.mark.parametrize("bad", [{"epochs": 0}, {"batch_size": 0}, {"batch_size": -1}, {"lr": 0.0}, {"lr": float("nan")},
                                 {"patience": -1}, {"bootstrap": -1}, {"workers": -1}, {"extract_batch_size": 0},
                                 {"near_duplicate_threshold": -1}, {"near_duplicate_threshold": 257}, {"rotation": -5.0},
                                 {"seed": -1}, {"folds": -2}, {"val_size": 1.0}, {"weight_decay": -0.1},
                                 {"align_threshold": 1.5}, {"lr": "0.001"}, {"input_size": -1},
                                 {"input_size": 16}])
def test_out_of_range_numbers_are_refused_with_the_field_and_its_range(bad) -> None:
    (name, value), = bad.items()
    with pytest.raises(ValueError, match=f"^{name} must be "):
        TrainConfig(data="x", **bad).validate()


def test_the_edges_of_each_range_are_accepted() -> None:
    TrainConfig(data="x", epochs=1, batch_size=1, patience=0, bootstrap=0, workers=0, extract_batch_size=1,
                near_duplicate_threshold=0, rotation=0.0, seed=0, folds=0, val_size=0.0, align_threshold=0.0,
                backbone_lr_scale=1.0, lr_decay=1.0, input_size=32).validate()


def test_bounds_live_in_the_field_metadata() -> None:
    from cxrnn.training.config import Bounds, field_bounds

    bounded = {f.name for f in fields(TrainConfig) if "bounds" in f.metadata}
    assert {"epochs", "batch_size", "lr", "patience", "bootstrap", "workers", "extract_batch_size",
            "near_duplicate_threshold", "rotation", "test_size", "val_size"} <= bounded
    assert str(field_bounds("batch_size")) == ">= 1" and str(field_bounds("lr")) == "> 0"
    assert str(Bounds(0, 1, low_open=True, high_open=True)) == "in (0, 1)"


def test_allow_outside_paths_is_off_by_default() -> None:
    assert TrainConfig().allow_outside_paths is False
