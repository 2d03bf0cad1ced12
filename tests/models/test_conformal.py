"""Class-conditional split-conformal sets: the stored thresholds reproduce crepes, and the guarantee holds."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cxrnn.models.conformal import ConformalSets, check_coverage, minimum_per_class

CLASSES = ["covid", "normal", "pneumonia"]


def _probs(rng: np.random.Generator, labels: np.ndarray, sharpness: float = 1.5) -> np.ndarray:
    logits = rng.normal(size=(len(labels), 3)) * 2.0
    logits[np.arange(len(labels)), labels] += sharpness
    p = np.exp(logits)
    return p / p.sum(axis=1, keepdims=True)


def test_stored_thresholds_give_exactly_crepes_sets():
    from crepes import ConformalClassifier
    from crepes.extras import hinge

    rng = np.random.default_rng(0)
    for n in (12, 19, 57, 250):
        labels = rng.integers(0, 3, n)
        cal = _probs(rng, labels)
        test = _probs(rng, rng.integers(0, 3, 300))
        test[:10] = cal[:10]  # ties with calibration scores sit exactly on a threshold
        sets = ConformalSets.calibrate(cal, labels, CLASSES, coverage=0.9)
        fitted = ConformalClassifier().fit(hinge(cal, np.arange(3), labels), bins=labels)
        scores = hinge(test)
        library = np.stack([fitted.predict_set(scores, bins=np.full(len(test), k), confidence=0.9, smoothing=False)[:, k]
                            for k in range(3)], axis=1).astype(bool)
        assert np.array_equal(sets.prediction_sets(test), library), n


def test_each_class_is_covered_at_the_stated_level():
    rng = np.random.default_rng(1)
    labels = np.repeat([0, 1, 2], [300, 900, 300])  # unbalanced: a marginal guarantee would short-change 0 and 2
    cal = _probs(rng, labels, sharpness=1.0)
    sets = ConformalSets.calibrate(cal, labels, CLASSES, coverage=0.9)
    test_labels = np.repeat([0, 1, 2], 4000)
    member = sets.prediction_sets(_probs(rng, test_labels, sharpness=1.0))
    covered = member[np.arange(len(test_labels)), test_labels]
    for k in range(3):
        assert 0.88 <= covered[test_labels == k].mean() <= 0.94, (k, covered[test_labels == k].mean())
    assert sets.warnings == ()


def test_a_class_with_too_few_calibration_images_is_put_in_every_set_with_a_warning():
    rng = np.random.default_rng(2)
    labels = np.array([0] * 40 + [1] * 40 + [2] * 9)  # 9 < 1 / (1 - 0.9)
    sets = ConformalSets.calibrate(_probs(rng, labels), labels, CLASSES, coverage=0.9)
    assert minimum_per_class(0.9) == 10 and minimum_per_class(0.95) == 20
    assert math.isinf(sets.thresholds[2]) and all(math.isfinite(t) for t in sets.thresholds[:2])
    assert sets.warnings == ("class pneumonia: 9 calibration image(s), fewer than the 10 that coverage 0.9 needs: "
                             "'pneumonia' is put in every prediction set",)
    assert sets.prediction_sets(_probs(rng, np.zeros(50, dtype=int)))[:, 2].all()


def test_round_trip_through_model_extras_and_old_models():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 3, 90)
    sets = ConformalSets.calibrate(_probs(rng, labels), labels, CLASSES, coverage=0.8, calibrated_on="validation split")
    again = ConformalSets.from_extras({"conformal": sets.to_extras()})
    assert again == sets
    assert ConformalSets.from_extras({}) is None and ConformalSets.from_extras(None) is None
    assert sets.set_names(np.array([[0.98, 0.01, 0.01]])) == [["covid"]]


@pytest.mark.parametrize("value", [0, 1, 1.5, -0.1, float("nan"), True, "0.9"])
def test_coverage_outside_the_open_unit_interval_is_refused(value):
    with pytest.raises(ValueError, match="coverage must be strictly between 0 and 1"):
        check_coverage(value)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match=r"need \(N, 3\) probabilities"):
        ConformalSets.calibrate(np.ones((4, 2)) / 2, np.zeros(4, dtype=int), CLASSES)


def test_a_singleton_that_is_not_the_top_class_is_referred_in_prediction_and_in_the_metrics():
    from cxrnn.evaluation.scoring import conformal_metrics
    from cxrnn.inference.predictor import referral

    # thresholds on 1 - p: covid only when p >= 0.9, normal when p >= 0.5, pneumonia when p >= 0.2
    sets = ConformalSets(tuple(CLASSES), 0.9, (0.1, 0.5, 0.8), (50, 50, 50), "test")
    probs = np.array([[0.95, 0.03, 0.02],   # {covid} = top: kept
                      [0.60, 0.10, 0.30]])  # {pneumonia} but the top class is covid: referred
    assert sets.set_names(probs) == [["covid"], ["pneumonia"]]
    assert referral(["pneumonia"], None, 0.9, label="covid") == (
        True, "prediction set {pneumonia} disagrees with the top class covid")
    block = conformal_metrics(sets, np.array([0, 2]), probs, n_boot=0)
    assert block["set_sizes"]["singleton"] == 1.0
    assert block["operating_point"]["referred"] == 0.5 and block["operating_point"]["kept_accuracy"] == 1.0
