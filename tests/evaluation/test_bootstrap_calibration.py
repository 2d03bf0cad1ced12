import numpy as np
import pytest

from cxrnn.evaluation.bootstrap import bootstrap_ci, weighted_metrics
from cxrnn.evaluation.calibration import expected_calibration_error, fit_temperature, softmax
from cxrnn.evaluation.metrics import compute_metrics

CLASSES = ["covid", "normal", "pneumonia"]


def _predictions(n: int, seed: int):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    logits = rng.normal(size=(n, 3))
    logits[np.arange(n), y] += 1.5
    return y, softmax(logits)


def test_unit_weights_reproduce_the_plain_metrics():
    y, p = _predictions(150, 0)
    m = compute_metrics(y, p, CLASSES)
    w = weighted_metrics(np.ones((1, len(y))), y, p, CLASSES)
    assert w["accuracy"][0] == pytest.approx(m["accuracy"])
    assert w["macro_f1"][0] == pytest.approx(m["macro_f1"])
    assert w["macro_auc"][0] == pytest.approx(m["macro_auc"])
    for c in CLASSES:
        assert w[f"{c}/recall"][0] == pytest.approx(m["per_class"][c]["recall"])
        assert w[f"{c}/specificity"][0] == pytest.approx(m["per_class"][c]["specificity"])
        assert w[f"{c}/auc"][0] == pytest.approx(m["per_class"][c]["auc"])


def test_intervals_contain_the_estimate_and_narrow_with_more_data():
    widths = []
    for n in (60, 600):
        y, p = _predictions(n, 1)
        m = compute_metrics(y, p, CLASSES)
        ci = bootstrap_ci(y, p, CLASSES, n_boot=500, seed=0)
        for key in ("accuracy", "macro_f1", "macro_auc"):
            assert ci[key]["low"] <= m[key] <= ci[key]["high"]
        for c in CLASSES:
            assert ci["per_class"][c]["recall"]["low"] <= m["per_class"][c]["recall"] <= ci["per_class"][c]["recall"]["high"]
        widths.append(ci["accuracy"]["high"] - ci["accuracy"]["low"])
    assert widths[1] < widths[0] / 2


def test_ece_of_a_known_case():
    # two predictions at confidence 0.9, one right one wrong: |0.5 - 0.9| = 0.4
    probs = np.array([[0.9, 0.1], [0.9, 0.1]])
    assert expected_calibration_error(probs, np.array([0, 1])) == pytest.approx(0.4)
    assert expected_calibration_error(probs, np.array([0, 0])) == pytest.approx(0.1)


def test_temperature_scaling_lowers_ece_of_an_overconfident_model():
    rng = np.random.default_rng(2)
    n = 2000
    y = rng.integers(0, 3, n)
    logits = rng.normal(size=(n, 3))
    logits[np.arange(n), y] += 1.0
    overconfident = logits * 4.0  # well-ranked but far too sure
    val, test = slice(0, 1000), slice(1000, None)
    t = fit_temperature(overconfident[val], y[val])
    assert t == pytest.approx(4.0, rel=0.25)
    before = expected_calibration_error(softmax(overconfident[test]), y[test])
    after = expected_calibration_error(softmax(overconfident[test], t), y[test])
    assert after < before / 2
    assert (softmax(overconfident[test], t).argmax(1) == overconfident[test].argmax(1)).all()
