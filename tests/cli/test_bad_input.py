"""The command line refuses bad values before any work, with one line that names the option or the file."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cxrnn.cli import app
from cxrnn.cli.options import cli_fields, option_name

runner = CliRunner()


def loader_takes_outside_paths() -> bool:
    from cxrnn.data.dataset import load_dataset

    return "allow_outside_paths" in inspect.signature(load_dataset).parameters


@pytest.mark.parametrize("argv, option", [
    (["predict", "m.pt", "x.png", "--batch-size", "0"], "--batch-size"),
    (["predict", "m.pt", "x.png", "--batch-size", "-1"], "--batch-size"),
    (["explain", "m.pt", "x.png", "--out", "o", "--batch-size", "0"], "--batch-size"),
    (["explain", "m.pt", "x.png", "--out", "o", "--alpha", "2"], "--alpha"),
    (["explain-eval", "m.pt", "--data", "d", "--batch-size", "0"], "--batch-size"),
    (["evaluate", "m.pt", "--data", "d", "--bootstrap", "-1"], "--bootstrap"),
    (["serve", "m.pt", "--port", "70000"], "--port"),
    (["serve", "m.pt", "--batch", "0"], "--batch"),
    (["serve", "m.pt", "--max-mb", "0"], "--max-mb"),
    (["serve", "m.pt", "--timeout-s", "-1"], "--timeout-s"),
    (["serve", "m.pt", "--batch-ms", "-1"], "--batch-ms"),
    (["extract", "--data", "d", "--batch-size", "0"], "--batch-size"),
    (["extract", "--data", "d", "--workers", "-1"], "--workers"),
    (["phantom", "o", "--per-class", "0"], "--per-class"),
    (["phantom", "o", "--size", "3"], "--size"),
    (["phantom", "o", "--difficulty", "0"], "--difficulty"),
    (["phantom", "o", "--sources", "0"], "--sources"),
    (["audit", "d", "--threshold", "-1"], "--threshold"),
    (["audit", "d", "--align-threshold", "1.5"], "--align-threshold"),
    (["compare", "--data", "d", "--epochs", "0"], "--epochs"),
    (["train", "--data", "d", "--batch-size", "0"], "--batch-size"),
    (["train", "--data", "d", "--lr", "nan"], "--lr"),
    (["train", "--data", "d", "--patience", "-1"], "--patience"),
])
def test_out_of_range_numbers_are_usage_errors(argv, option, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may be written, but if it were, not into the checkout
    result = runner.invoke(app, argv)
    assert result.exit_code == 2, result.output
    assert f"Invalid value for '{option}'" in result.output and "must be" in result.output
    assert list(tmp_path.iterdir()) == []


def test_every_bounded_training_field_is_checked_on_the_command_line():
    from cxrnn.training.config import Bounds

    for f in cli_fields():
        bounds = f.metadata.get("bounds")
        if bounds is None:
            continue
        low = bounds.low if bounds.low is not None else bounds.high
        outside = low - 1 if bounds.low is not None else bounds.high + 1
        assert isinstance(bounds, Bounds)
        result = runner.invoke(app, ["train", "--data", "d", option_name(f.name), str(outside)])
        assert result.exit_code == 2 and f"'{option_name(f.name)}'" in result.output, f.name


def test_predictor_refuses_a_batch_size_below_one():
    from cxrnn.inference.predictor import Predictor

    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
            Predictor(None, batch_size=bad)  # type: ignore[arg-type]  # refused before the model is touched


def test_predict_exits_1_when_no_file_could_be_read(trained_run, tmp_path):
    bad = [tmp_path / "a.png", tmp_path / "b.png"]
    for p in bad:
        p.write_bytes(b"not an image")
    for extra in ([], ["--json"]):
        result = runner.invoke(app, ["predict", str(trained_run.model_path), *map(str, bad), *extra])
        assert result.exit_code == 1, result.output
        assert "error: none of the 2 file(s) could be read" in result.output
        assert result.output.count("error:") == 1
    as_json = runner.invoke(app, ["predict", str(trained_run.model_path), *map(str, bad), "--json"])
    assert [json.loads(line)["path"] for line in as_json.stdout.splitlines()] == list(map(str, bad))


def test_predict_text_is_one_line_per_file(trained_run, phantom_dir, tmp_path):
    good = sorted((phantom_dir / "covid").glob("*.png"))[0]
    odd = tmp_path / ("a very long name, " * 8 + "with a\nnewline and [bold]markup.png")
    odd.write_bytes(good.read_bytes())
    broken = tmp_path / "broken\nfile.png"
    broken.write_bytes(b"not an image")
    result = runner.invoke(app, ["predict", str(trained_run.model_path), str(odd), str(broken)],
                           env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output  # one file was predicted
    lines = result.stdout.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(str(odd).replace("\n", "\\n") + ": ")
    assert "[bold]markup" in lines[0]
    errors = [line for line in result.stderr.splitlines() if "broken" in line]
    assert len(errors) == 1 and "broken\\nfile.png" in errors[0]
    assert "1 of 2 file(s) could not be read" in result.stderr


def test_explain_out_that_is_a_file_is_refused_before_any_work(trained_run, phantom_dir, tmp_path):
    out = tmp_path / "out"
    out.write_text("keep me")
    image = sorted((phantom_dir / "covid").glob("*.png"))[0]
    result = runner.invoke(app, ["explain", str(trained_run.model_path), str(image), "--out", str(out)])
    assert result.exit_code == 2
    assert f"error: --out {out} exists and is not a folder" in result.output
    assert result.output.count("error:") == 1 and "Traceback" not in result.output
    assert out.read_text() == "keep me"


def test_predict_cam_that_is_a_file_is_refused(trained_run, phantom_dir, tmp_path):
    cam = tmp_path / "cam"
    cam.write_text("")
    image = sorted((phantom_dir / "covid").glob("*.png"))[0]
    result = runner.invoke(app, ["predict", str(trained_run.model_path), str(image), "--cam", str(cam)])
    assert result.exit_code == 2 and f"--cam {cam} exists and is not a folder" in result.output
    assert result.stdout == ""  # refused before any prediction


def test_train_out_that_is_a_file_is_refused(tmp_path, monkeypatch):
    import cxrnn.training

    def must_not_run(cfg, progress=None, log=None):
        raise AssertionError("trained into a file")

    monkeypatch.setattr(cxrnn.training, "train", must_not_run)
    out = tmp_path / "run"
    out.write_text("")
    result = runner.invoke(app, ["train", "--data", "d", "--out", str(out)])
    assert result.exit_code == 2 and "exists and is not a folder" in result.output


@pytest.mark.parametrize("command", ["train", "evaluate", "extract", "audit", "explain-eval", "compare"])
def test_commands_that_load_a_dataset_take_allow_outside_paths(command):
    text = runner.invoke(app, [command, "--help"], env={"COLUMNS": "250"}).output
    assert "--allow-outside-paths" in text


def outside_manifest(tmp_path: Path, phantom_dir: Path) -> Path:
    """A manifest in its own folder whose rows point at the phantom's images, outside that folder."""
    rows = (phantom_dir / "manifest.csv").read_text().splitlines()
    header = rows[0].split(",")
    columns = [header.index(c) for c in ("path", "mask", "lung_mask") if c in header]
    out = [rows[0]]
    for row in rows[1:]:
        cells = row.split(",")
        for i in columns:
            if cells[i]:
                cells[i] = str((phantom_dir / cells[i]).resolve())
        out.append(",".join(cells))
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    manifest = folder / "manifest.csv"
    manifest.write_text("\n".join(out) + "\n")
    return manifest


@pytest.mark.skipif(not loader_takes_outside_paths(), reason="load_dataset has no allow_outside_paths keyword yet")
def test_evaluate_refuses_outside_paths_unless_allowed(trained_run, phantom_dir, tmp_path):
    manifest = outside_manifest(tmp_path, phantom_dir)
    model = str(trained_run.model_path)
    refused = runner.invoke(app, ["evaluate", model, "--data", str(manifest), "--out", str(tmp_path / "e1"),
                                  "--bootstrap", "0"])
    assert refused.exit_code == 2 and refused.output.count("error:") == 1, refused.output
    allowed = runner.invoke(app, ["evaluate", model, "--data", str(manifest), "--out", str(tmp_path / "e2"),
                                  "--bootstrap", "0", "--allow-outside-paths"])
    assert allowed.exit_code == 0, allowed.output


def test_allow_outside_paths_reaches_the_training_config(monkeypatch):
    import cxrnn.training

    seen = []

    def fake_train(cfg, progress=None, log=None):
        seen.append(cfg)
        raise RuntimeError("stopped before training")

    monkeypatch.setattr(cxrnn.training, "train", fake_train)
    runner.invoke(app, ["train", "--data", "d"])
    runner.invoke(app, ["train", "--data", "d", "--allow-outside-paths"])
    assert [cfg.allow_outside_paths for cfg in seen] == [False, True]
