"""The command line parses and prints; its options and defaults come from the library."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from cxrnn.cli import app
from cxrnn.cli.options import cli_fields, option_name
from cxrnn.training.config import TrainConfig

runner = CliRunner()


def command_params(name: str) -> dict:
    command = typer.main.get_command(app).commands[name]  # type: ignore[attr-defined]
    return {p.name: p for p in command.params}


def test_train_has_one_option_per_config_field_with_todays_spellings():
    params = command_params("train")
    assert set(params) == {f.name for f in cli_fields()} | {"config"}
    assert "head_options" not in params  # a dict: YAML only
    for f in cli_fields():
        assert option_name(f.name) in params[f.name].opts, f.name
        assert params[f.name].default is None, f.name  # None = not given, so the config file can win
    assert params["finetune"].secondary_opts == ["--frozen"]
    assert params["dedup"].secondary_opts == ["--no-dedup"]
    for one_way in ("freeze_rnn", "strict", "leave_one_source_out"):
        assert params[one_way].is_flag and not params[one_way].secondary_opts, one_way
    text = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "250"}).output
    for f in cli_fields():
        assert option_name(f.name) in text, f.name


class Captured(RuntimeError):
    """Raised by the stand-in for training, which the command turns into an error line."""


@pytest.fixture
def captured(monkeypatch):
    """Replace the training run by one that records the resolved TrainConfig and stops."""
    import cxrnn.training

    seen: list[TrainConfig] = []

    def fake_train(cfg, progress=None, log=None):
        seen.append(cfg)
        raise Captured("stopped before training")

    monkeypatch.setattr(cxrnn.training, "train", fake_train)
    return seen


# A value other than the default for every option, so each one is seen to reach the config.
GIVEN = dict(data="d", backbone="vgg19", head="gru", weights="none", input_size=320, out="o", seed=3, test_size=0.3,
             val_size=0.2, folds=3, group_by="patient_id", optimizer="sgd", lr=0.01, lr_schedule="constant", lr_decay=0.5,
             weight_decay=0.001, epochs=2, batch_size=4, patience=1, finetune=True, freeze_rnn=True,
             backbone_lr_scale=0.5, rotation=5.0, preset="paper", cache_dir="c", feature_dtype="float16",
             extract_batch_size=4, extract_runtime="torch", strict=True, device="cuda", bootstrap=10, coverage=0.8, dedup=False,
             near_duplicate_threshold=4, align_threshold=0.5, leave_one_source_out=True, precision="bf16",
             workers=1, image_cache="i", allow_outside_paths=True)


def argv_for(values: dict) -> list[str]:
    argv: list[str] = []
    for name, value in values.items():
        if name == "finetune":
            argv.append("--finetune" if value else "--frozen")
        elif name == "dedup":
            argv.append("--dedup" if value else "--no-dedup")
        elif isinstance(value, bool):
            assert value, "one-way flags can only be switched on"
            argv.append(option_name(name))
        else:
            argv += [option_name(name), str(value)]
    return argv


def test_every_option_reaches_the_config(captured):
    assert set(GIVEN) == {f.name for f in cli_fields()}  # a new field needs a value here
    result = runner.invoke(app, ["train", *argv_for(GIVEN)])
    assert result.exit_code == 2 and "stopped before training" in result.output
    (cfg,) = captured
    for name, value in GIVEN.items():
        assert getattr(cfg, name) == value, name
        assert value != getattr(TrainConfig(), name), name


def test_command_line_beats_config_file_beats_preset(captured, tmp_path):
    path = tmp_path / "c.yaml"
    TrainConfig(data="from-file", epochs=7, lr=0.5, finetune=True, dedup=False, strict=True, preset="paper").to_yaml(path)
    result = runner.invoke(app, ["train", "--config", str(path), "--epochs", "3", "--frozen", "--dedup"])
    assert result.exit_code == 2, result.output
    (cfg,) = captured
    assert (cfg.epochs, cfg.finetune, cfg.dedup) == (3, False, True)  # given: the command line wins
    assert (cfg.data, cfg.lr, cfg.strict) == ("from-file", 0.5, True)  # not given: the file's values stay
    assert (cfg.optimizer, cfg.batch_size) == ("rmsprop", 16)  # in neither: the file's preset
    assert cfg.near_duplicate_threshold == TrainConfig().near_duplicate_threshold


def test_train_without_data_names_the_option(captured):
    result = runner.invoke(app, ["train", "--epochs", "1"])
    assert result.exit_code == 2 and "--data is required" in result.output and not captured
    assert result.output.count("error:") == 1  # one line, not a second one for the exit itself
    bad = runner.invoke(app, ["train", "--data", "d", "--optimizer", "lion"])
    assert bad.exit_code == 2 and "lion" in bad.output and bad.output.count("error:") == 1 and not captured


def test_compare_takes_its_training_options_from_the_config_file(tmp_path, monkeypatch):
    import cxrnn.training.compare

    seen = []

    def fake_compare(cfg, backbones, heads, out, progress=None, log=None):
        seen.append((cfg, backbones, heads))
        raise RuntimeError("stopped before training")

    monkeypatch.setattr(cxrnn.training.compare, "compare", fake_compare)
    path = tmp_path / "c.yaml"
    TrainConfig(data="from-file", weights="none", epochs=7).to_yaml(path)
    result = runner.invoke(app, ["compare", "--config", str(path), "--epochs", "2", "--backbones", "vgg19, densenet121"])
    assert result.exit_code == 2 and "stopped before training" in result.output
    ((cfg, backbones, heads),) = seen
    assert (cfg.data, cfg.weights, cfg.epochs) == ("from-file", "none", 2)
    assert backbones == ["vgg19", "densenet121"] and heads == ["lstm", "pool"]


def test_other_commands_take_their_defaults_from_the_library():
    from cxrnn.audit.thresholds import DEFAULT_ALIGN_THRESHOLD, DEFAULT_THRESHOLD
    from cxrnn.data.phantom import PhantomConfig
    from cxrnn.evaluation.bootstrap import DEFAULT_BOOTSTRAP

    audit = command_params("audit")
    assert (audit["threshold"].default, audit["align_threshold"].default) == (DEFAULT_THRESHOLD, DEFAULT_ALIGN_THRESHOLD)
    assert command_params("evaluate")["bootstrap"].default == DEFAULT_BOOTSTRAP
    defaults = TrainConfig()
    assert TrainConfig().bootstrap == DEFAULT_BOOTSTRAP
    extract = command_params("extract")
    for option, field_name in (("backbone", "backbone"), ("runtime", "extract_runtime"), ("batch_size", "extract_batch_size"),
                               ("feature_dtype", "feature_dtype"), ("precision", "precision"), ("workers", "workers")):
        assert extract[option].default == getattr(defaults, field_name), option
    phantom = command_params("phantom")
    for name in ("per_class", "size", "seed", "difficulty", "sources", "shortcut"):
        assert phantom[name].default == getattr(PhantomConfig(), name), name


def test_evaluate_writes_intervals_ece_and_reliability(trained_run, phantom_dir, tmp_path):
    from cxrnn.evaluation.bootstrap import DEFAULT_BOOTSTRAP

    out = tmp_path / "eval"
    result = runner.invoke(app, ["evaluate", str(trained_run.model_path), "--data", str(phantom_dir), "--out", str(out)])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["ci"]["n_boot"] == DEFAULT_BOOTSTRAP
    low, high = metrics["ci"]["accuracy"]["low"], metrics["ci"]["accuracy"]["high"]
    assert low < high  # 120 images, not all of them right or all wrong: a real interval
    assert 0 < metrics["ece"] < 0.5 and len(metrics["reliability"]) > 0
    for name in ("confusion_matrix.png", "roc.png", "reliability.png", "predictions.csv"):
        assert (out / name).stat().st_size > 0, name
    assert f"accuracy {metrics['accuracy']:.3f}" in result.output
    rows = (out / "predictions.csv").read_text().splitlines()
    assert len(rows) == 1 + metrics["n"]

    again = runner.invoke(app, ["evaluate", str(trained_run.model_path), "--data", str(phantom_dir), "--out",
                                str(tmp_path / "no-ci"), "--bootstrap", "0"])
    assert again.exit_code == 0, again.output
    assert "ci" not in json.loads((tmp_path / "no-ci" / "metrics.json").read_text())


def test_predict_cam_reads_and_runs_each_file_once_with_unchanged_output(trained_run, phantom_dir, tmp_path,
                                                                         monkeypatch):
    import cxrnn.explain.cam
    import cxrnn.inference.predictor
    from cxrnn.inference.predictor import Predictor

    files = [*sorted((phantom_dir / "covid").glob("*.png"))[:3], *sorted((phantom_dir / "normal").glob("*.png"))[:2]]
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    argv = [str(trained_run.model_path), str(files[0]), str(bad), *map(str, files[1:]), "--json", "--batch-size", "4"]
    plain = runner.invoke(app, ["predict", *argv])
    assert plain.exit_code == 0, plain.output

    reads: dict[str, int] = {}
    engine_passes = []
    for module, reader in ((cxrnn.explain.cam, "read_image_checked"), (cxrnn.inference.predictor, "read_image_checked")):
        original = getattr(module, reader)

        def counting(path, *args, _original=original, **kwargs):
            reads[str(path)] = reads.get(str(path), 0) + 1
            return _original(path, *args, **kwargs)

        monkeypatch.setattr(module, reader, counting)
    original_engine_pass = Predictor.predict_with_ood

    def counting_engine_pass(self, images):
        engine_passes.append(len(images))
        return original_engine_pass(self, images)

    monkeypatch.setattr(Predictor, "predict_with_ood", counting_engine_pass)
    out = tmp_path / "maps"
    with_cam = runner.invoke(app, ["predict", *argv, "--cam", str(out)])
    assert with_cam.exit_code == 0, with_cam.output

    def json_lines(text: str) -> list[dict]:
        return [json.loads(line) for line in text.splitlines() if line.startswith("{")]

    # Same objects, same floats, same order: the CAM pass's probabilities and OOD scores are the engine's.
    assert json_lines(with_cam.stdout) == json_lines(plain.stdout)
    assert len(json_lines(plain.stdout)) == len(files) + 1
    assert reads == {str(p): 1 for p in [*files, bad]}
    assert engine_passes == []  # torch on the CPU in fp32: the CAM pass is the only forward pass
    index = json.loads((out / "explanations.json").read_text())
    assert index["n"] == len(files) and index["errors"] == 1 and index["target"] == "predicted"
    by_path = {e["path"]: e for e in index["images"]}
    for line in json_lines(plain.stdout):
        if "error" in line:
            continue
        entry = by_path[line["path"]]
        assert entry["label"] == entry["target"] == line["label"]
        assert entry["probabilities"] == line["probabilities"]
        cam = np.load(out / f"{Path(line['path']).stem}_cam.npy")
        assert cam.max() > 0.5
