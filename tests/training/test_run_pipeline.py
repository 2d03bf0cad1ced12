"""One run pipeline: a fine-tuning run gets the same evaluation, model file and card as a frozen run."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from cxrnn.data.phantom import PhantomConfig, generate_phantom
from cxrnn.evaluation.calibration import expected_calibration_error
from cxrnn.features.store import FeatureStore
from cxrnn.models.backbones import create_backbone
from cxrnn.models.bundle import load_bundle
from cxrnn.serve.card import model_card, wilson_interval
from cxrnn.training import TrainConfig, train


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("small")
    generate_phantom(root, PhantomConfig(per_class=12, size=64, seed=41))
    return root


def finetune(data, out, seed: int, cache) -> object:
    return train(TrainConfig(data=str(data), out=str(out), backbone="mobilenetv3_small_050", weights="none",
                             head="pool", finetune=True, epochs=1, batch_size=8, bootstrap=200, seed=seed,
                             cache_dir=str(cache), val_size=0.25))


@pytest.fixture(scope="module")
def two_finetuned(small, tmp_path_factory):
    cache = tmp_path_factory.mktemp("ft-cache")
    out = tmp_path_factory.mktemp("ft")
    return finetune(small, out / "a", 0, cache), finetune(small, out / "b", 1, cache), cache


def test_finetune_run_is_calibrated_with_intervals_like_a_frozen_run(two_finetuned) -> None:
    result = two_finetuned[0]
    m = json.loads((result.run_dir / "metrics.json").read_text())
    assert m["ci"]["n_boot"] == 200 and m["ci"]["accuracy"]["low"] <= m["accuracy"] <= m["ci"]["accuracy"]["high"]
    assert m["calibration"]["fitted_on"].startswith("validation split")
    assert m["calibration"]["ece_after"] == pytest.approx(m["ece"])
    # the ECE is the one of the probabilities the run wrote out (rounded to 6 decimals there)
    with open(result.run_dir / "predictions.csv") as fh:
        rows = list(csv.DictReader(fh))
    classes = m["classes"]
    probs = np.array([[float(r[f"p_{c}"]) for c in classes] for r in rows])
    truth = np.array([classes.index(r["label"]) for r in rows])
    assert expected_calibration_error(probs, truth) == pytest.approx(m["ece"], abs=1e-4)
    assert (result.run_dir / "reliability.png").stat().st_size > 0
    report = (result.run_dir / "report.md").read_text()
    assert "## Calibration" in report and "confidence intervals" in report
    bundle = load_bundle(result.model_path)
    assert bundle.temperature == pytest.approx(m["calibration"]["temperature"])
    assert bundle.notes == []


def test_model_card_shows_the_runs_bootstrap_interval_and_ece(two_finetuned) -> None:
    result = two_finetuned[0]
    m = json.loads((result.run_dir / "metrics.json").read_text())
    card = model_card(load_bundle(result.model_path), result.model_path, "torch")
    assert card["test_metrics"]["ci"]["accuracy"] == m["ci"]["accuracy"]
    assert card["test_metrics"]["ci"]["macro_f1"] == m["ci"]["macro_f1"]
    assert "accuracy_ci95" not in card["test_metrics"]
    assert card["calibration"]["ece"] == m["ece"]
    assert card["calibration"]["ece_before_temperature"] == m["calibration"]["ece_before"]
    assert card["notes"] == []


def test_two_fine_tuned_models_of_one_backbone_never_share_features(two_finetuned) -> None:
    a, b, cache = two_finetuned
    first, second = load_bundle(a.model_path), load_bundle(b.model_path)
    assert first.weights_id != second.weights_id
    keys = {FeatureStore(bundle.net.backbone, cache).key for bundle in (first, second)}
    frozen = FeatureStore(create_backbone("mobilenetv3_small_050", "none", seed=0), cache).key
    assert len(keys) == 2 and frozen not in keys
    # the id follows the weights, not the file: the same weights reloaded keep their key
    assert FeatureStore(load_bundle(a.model_path).net.backbone, cache).key == FeatureStore(first.net.backbone, cache).key


def test_an_older_model_file_loads_with_a_note_of_what_it_lacks(two_finetuned, tmp_path) -> None:
    payload = torch.load(two_finetuned[0].model_path, weights_only=True)
    payload["format_version"] = 2
    payload["metrics"] = {k: payload["metrics"][k] for k in ("n", "accuracy", "macro_f1", "macro_auc")}
    old = tmp_path / "old.pt"
    torch.save(payload, old)
    bundle = load_bundle(old)
    assert bundle.format_version == 2
    assert any("Wilson" in note for note in bundle.notes) and any("ECE" in note for note in bundle.notes)
    card = model_card(bundle, old, "torch")
    n, acc = payload["metrics"]["n"], payload["metrics"]["accuracy"]
    low, high = wilson_interval(acc * n, n)
    assert card["test_metrics"]["accuracy_ci95"] == {"low": low, "high": high, "method": "Wilson score interval"}
    assert card["calibration"]["ece"] is None and card["notes"] == bundle.notes
