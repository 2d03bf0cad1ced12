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
