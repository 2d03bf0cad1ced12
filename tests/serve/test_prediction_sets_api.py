"""Issue 15 on the server: /v1/predict and /v1/explain answer with the prediction set and the referral the
predictor computes (the same fields as ``cxrnn predict --json``), the schema documents them, the card shows
the calibration, and the web page's fields are filled from them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from cxrnn.cli import app as cli_app
from cxrnn.inference.predictor import Predictor
from cxrnn.models.bundle import load_bundle, save_bundle
from cxrnn.models.conformal import EXTRAS_KEY, ConformalSets
from cxrnn.serve.app import create_app

CLASSES = ("covid", "normal", "pneumonia")
FIELDS = ("label", "probabilities", "ood", "warnings", "prediction_set", "refer", "refer_reason")


@pytest.fixture(scope="module")
def conformal_model(trained_run, phantom_dir, tmp_path_factory) -> Path:
    """The trained model with a 90% conformal calibration fitted on every other phantom image."""
    bundle = load_bundle(trained_run.model_path)
    paths, labels = [], []
    for k, name in enumerate(CLASSES):
        files = sorted((phantom_dir / name).glob("*.png"))[0::2]
        paths += files
        labels += [k] * len(files)
    probs = np.array([[p.probabilities[c] for c in bundle.classes] for p in Predictor(bundle).predict_paths(paths)])
    bundle.extras[EXTRAS_KEY] = ConformalSets.calibrate(probs, np.asarray(labels), bundle.classes, 0.9,
                                                        calibrated_on="half the test phantom").to_extras()
    return save_bundle(bundle, tmp_path_factory.mktemp("conformal-serve") / "model.pt")


@pytest.fixture(scope="module")
def client(conformal_model):
    with TestClient(create_app(conformal_model, batch=1)) as c:
        yield c


@pytest.fixture(scope="module")
def noise_png(tmp_path_factory, encode) -> Path:
    path = tmp_path_factory.mktemp("noise") / "noise.png"
    path.write_bytes(encode.png(np.random.default_rng(0).integers(0, 256, (256, 256), dtype=np.uint8)))
    return path


def post(client, path: Path, route: str = "/v1/predict"):
    response = client.post(route, files={"file": (path.name, path.read_bytes(), "application/octet-stream")})
    assert response.status_code == 200, response.text
    return response.json()


def predict_json(model: Path, path: Path) -> dict:
    result = CliRunner().invoke(cli_app, ["predict", str(model), str(path), "--json"])
    assert result.exit_code == 0, result.output
    (line,) = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    return line


def test_predict_and_explain_answer_with_the_cli_sets(client, conformal_model, phantom_png):
    body = post(client, phantom_png)
    cli = predict_json(conformal_model, phantom_png)
    assert set(body["prediction_set"]) <= set(CLASSES)
    for key in ("label", "prediction_set", "refer", "refer_reason", "warnings"):
        assert body[key] == cli[key], key
    assert body["probabilities"] == pytest.approx(cli["probabilities"], abs=1e-6)
    assert body["ood"]["flagged"] == cli["ood"]["flagged"]
    sets = ConformalSets.from_extras(load_bundle(conformal_model).extras)
    assert body["prediction_set"] == sets.set_names(np.array([[body["probabilities"][c] for c in CLASSES]]))[0]
    explained = post(client, phantom_png, "/v1/explain")
    for key in ("prediction_set", "refer", "refer_reason"):
        assert explained[key] == body[key], key


def test_noise_is_referred_by_the_server(client, noise_png):
    body = post(client, noise_png)
    assert body["refer"] is True
    assert body["ood"]["flagged"] and "out of distribution: unlike the training images" in body["refer_reason"]
    assert isinstance(body["prediction_set"], list)


def test_schema_and_card_document_the_sets(client):
    schema = client.get("/openapi.json").json()["components"]["schemas"]
    for model in ("PredictResponse", "ExplainResponse"):
        props = schema[model]["properties"]
        assert {"prediction_set", "refer", "refer_reason"} <= set(props)
        assert "refer" in schema[model]["required"]
        assert props["refer"]["description"] and props["prediction_set"]["description"]
    card = client.get("/v1/model").json()["prediction_sets"]
    assert card["coverage"] == 0.9 and card["calibrated_on"] == "half the test phantom"
    assert set(card["calibration_counts"]) == set(CLASSES)


def test_old_model_answers_without_sets(trained_run, tmp_path, phantom_png, noise_png):
    bundle = load_bundle(trained_run.model_path)
    bundle.extras.pop(EXTRAS_KEY, None)
    old = save_bundle(bundle, tmp_path / "model.pt")
    with TestClient(create_app(old, batch=1)) as c:
        assert c.get("/v1/model").json()["prediction_sets"] is None
        good, noise = post(c, phantom_png), post(c, noise_png)
    assert good["prediction_set"] is None and noise["prediction_set"] is None
    assert good["refer"] is good["ood"]["flagged"]
    assert noise["refer"] is True and noise["refer_reason"] == "out of distribution: unlike the training images"
