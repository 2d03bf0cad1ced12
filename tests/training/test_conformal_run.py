"""Conformal prediction sets of a training run: metrics.json's ``conformal`` block, the model file's
calibration, report.md and risk_coverage.png, the --coverage option, and a too-small calibration split."""

from __future__ import annotations

import json
import math

import numpy as np
from typer.testing import CliRunner

from cxrnn.cli import app
from cxrnn.models.conformal import EXTRAS_KEY, ConformalSets, minimum_per_class

runner = CliRunner()


def _inside(entry: dict) -> None:
    assert 0.0 <= entry["estimate"] <= 1.0
    if entry["low"] is not None:
        assert entry["low"] <= entry["estimate"] <= entry["high"]


def test_a_run_records_its_prediction_sets_and_their_test_coverage(trained_run):
    metrics = json.loads((trained_run.run_dir / "metrics.json").read_text())
    conformal = metrics["conformal"]
    classes = metrics["classes"]
    assert conformal["target_coverage"] == 0.9
    assert conformal["calibrated_on"].startswith(f"validation split ({metrics['split']['val']} images")
    assert "test split" in conformal["calibrated_on"]
    assert list(conformal["per_class"]) == classes == list(conformal["thresholds"]) == list(conformal["calibration_counts"])
    assert sum(conformal["calibration_counts"].values()) == metrics["split"]["val"]
    assert conformal["n"] == metrics["n"] and conformal["coverage"]["n"] == metrics["n"]
    _inside(conformal["coverage"])
    assert conformal["coverage"]["low"] is not None  # the run's bootstrap is on
    assert conformal["ci"]["n_boot"] == metrics["ci"]["n_boot"]
    for name in classes:
        _inside(conformal["per_class"][name])
    assert sum(conformal["per_class"][c]["n"] for c in classes) == metrics["n"]
    assert math.isclose(sum(conformal["set_sizes"].values()), 1.0)
    assert conformal["mean_set_size"] >= conformal["set_sizes"]["singleton"]
    op = conformal["operating_point"]
    # kept: the set is exactly the top class, so never more than the singletons
    assert math.isclose(op["referred"] + op["kept"], 1.0) and op["kept"] <= conformal["set_sizes"]["singleton"] + 1e-12
    # The fixture's validation split holds 8 images per class, fewer than the 10 coverage 0.9 needs: such a
    # class is in every set (threshold null) and the run says so, rather than promising coverage it cannot.
    for name in classes:
        few = conformal["calibration_counts"][name] < minimum_per_class(0.9)
        assert (conformal["thresholds"][name] is None) == few
        assert any(w.startswith(f"class {name}:") for w in conformal["warnings"]) == few
    curve = conformal["risk_coverage"]
    assert len(curve) == 21 and curve[0]["kept"] == 1.0 and curve[0]["n_kept"] == metrics["n"]
    assert math.isclose(curve[0]["accuracy"], metrics["accuracy"])
    assert curve[-1] == {"kept": 0.0, "n_kept": 0, "accuracy": None}
    print(f"\ntest coverage {conformal['coverage']} (target 0.9); per class "
          + ", ".join(f"{c} {v['estimate']:.3f} of {v['n']}" for c, v in conformal["per_class"].items())
          + f"; mean set size {conformal['mean_set_size']:.3f}; calibration counts {conformal['calibration_counts']}")


def test_the_model_file_carries_the_calibration(trained_run):
    import torch

    payload = torch.load(trained_run.model_path, weights_only=True)
    sets = ConformalSets.from_extras(payload["extras"])
    assert sets is not None and EXTRAS_KEY in payload["extras"]
    metrics = trained_run.metrics["conformal"]
    assert list(sets.classes) == payload["classes"] and sets.coverage == 0.9
    assert sets.calibrated_on == metrics["calibrated_on"]
    assert [None if math.isinf(t) else t for t in sets.thresholds] == list(metrics["thresholds"].values())
    assert ConformalSets.from_extras({EXTRAS_KEY: sets.to_extras()}) == sets


def test_the_report_shows_the_prediction_sets_and_the_risk_coverage_plot(trained_run):
    report = (trained_run.run_dir / "report.md").read_text()
    assert "## Prediction sets" in report and "![risk-coverage](risk_coverage.png)" in report
    assert "empirical coverage" in report
    png = trained_run.run_dir / "risk_coverage.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_coverage_outside_zero_one_is_a_usage_error():
    for bad in ("0", "1", "1.5", "nan", "-0.1"):
        result = runner.invoke(app, ["train", "--data", "d", "--coverage", bad])
        assert result.exit_code == 2, (bad, result.output)
        assert "'--coverage'" in result.output, bad


def test_coverage_is_checked_in_the_config_too():
    import pytest

    from cxrnn.training.config import TrainConfig

    assert TrainConfig().coverage == 0.9
    TrainConfig(coverage=0.8).validate()
    for bad in (0, 1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="coverage must be"):
            TrainConfig(coverage=bad).validate()


def test_a_tiny_calibration_split_warns_and_puts_the_class_in_every_set():
    from types import SimpleNamespace

    from cxrnn.training.config import TrainConfig
    from cxrnn.training.run import fit_prediction_sets

    rng = np.random.default_rng(0)
    labels = np.array([0] * 30 + [1] * 4)  # 'small' has 4 validation images, fewer than the 10 needed at 0.9
    logits = rng.normal(size=(34, 2))
    logits[np.arange(34), labels] += 3
    model = SimpleNamespace(calibration_rows=np.arange(34), calibration_logits=logits)
    lines: list[str] = []
    sets = fit_prediction_sets(TrainConfig(), model, labels, ["big", "small"], 1.0, lines.append)
    assert sets is not None
    assert math.isfinite(sets.thresholds[0]) and math.isinf(sets.thresholds[1])
    assert sets.calibration_counts == (30, 4)
    assert [line for line in lines if "small" in line] == [f"warning: prediction sets: {sets.warnings[0]}"]
    assert "fewer than the 10" in sets.warnings[0]
    assert sets.prediction_sets(np.array([[0.99, 0.01]]))[0].tolist() == [True, True]

    from cxrnn.evaluation.scoring import conformal_metrics

    block = conformal_metrics(sets, labels, np.exp(logits) / np.exp(logits).sum(1, keepdims=True), n_boot=50)
    assert block["thresholds"]["small"] is None and block["per_class"]["small"]["estimate"] == 1.0
    json.dumps(block, allow_nan=False)  # metrics.json stays strict JSON


def test_no_validation_rows_skips_the_prediction_sets_with_a_log_line():
    from types import SimpleNamespace

    from cxrnn.training.config import TrainConfig
    from cxrnn.training.run import fit_prediction_sets

    lines: list[str] = []
    model = SimpleNamespace(calibration_rows=np.zeros(0, dtype=int), calibration_logits=np.zeros((0, 2)))
    assert fit_prediction_sets(TrainConfig(val_size=0.0), model, np.zeros(0, dtype=int), ["a", "b"], 1.0,
                               lines.append) is None
    assert len(lines) == 1 and "prediction sets skipped" in lines[0]


def test_k_fold_says_the_kept_fold_calibrated_the_sets():
    from types import SimpleNamespace

    from cxrnn.training.config import TrainConfig
    from cxrnn.training.run import fit_prediction_sets

    labels = np.array([0, 1] * 20)
    logits = np.eye(2)[labels] * 2.0
    model = SimpleNamespace(calibration_rows=np.arange(40), calibration_logits=logits)
    sets = fit_prediction_sets(TrainConfig(folds=3), model, labels, ["a", "b"], 1.0, lambda _: None)
    assert sets is not None and sets.calibrated_on.startswith("validation part of the kept fold of 3-fold")
    assert "40 images" in sets.calibrated_on


def test_evaluate_writes_the_conformal_block_or_a_note(trained_run, phantom_dir, tmp_path):
    from cxrnn.data.dataset import load_dataset
    from cxrnn.evaluation.scoring import NO_CONFORMAL, evaluate_to_dir
    from cxrnn.models.bundle import load_bundle

    bundle = load_bundle(trained_run.model_path)
    dataset = load_dataset(str(phantom_dir), classes=bundle.classes)
    result = evaluate_to_dir(bundle, dataset, tmp_path / "with", n_boot=50)
    block = json.loads((tmp_path / "with" / "metrics.json").read_text())["conformal"]
    assert block["n"] == len(dataset.samples) and block["target_coverage"] == 0.9
    assert block["calibrated_on"] == trained_run.metrics["conformal"]["calibrated_on"]
    _inside(block["coverage"])
    assert (tmp_path / "with" / "risk_coverage.png").exists()
    assert result.metrics["conformal"] == block

    bundle.extras.pop(EXTRAS_KEY)
    lines: list[str] = []
    evaluate_to_dir(bundle, dataset, tmp_path / "without", n_boot=0, log=lines.append)
    assert json.loads((tmp_path / "without" / "metrics.json").read_text())["conformal"] == {"note": NO_CONFORMAL}
    assert lines == [NO_CONFORMAL]
    assert not (tmp_path / "without" / "risk_coverage.png").exists()
