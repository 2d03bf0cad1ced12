from __future__ import annotations

import numpy as np
import pytest

from cxrnn.evaluation.metrics import compute_metrics


def test_metrics_are_keyed_by_class_name_and_correct() -> None:
    classes = ["covid", "normal", "pneumonia"]
    y_true = np.array([0, 0, 0, 1, 1, 2])
    y_pred = np.array([0, 0, 1, 1, 1, 2])
    probs = np.eye(3)[y_pred] * 0.8 + 0.2 / 3
    m = compute_metrics(y_true, probs, classes)
    assert m["accuracy"] == pytest.approx(5 / 6)
    assert m["confusion_matrix"] == [[2, 1, 0], [0, 2, 0], [0, 0, 1]]
    covid = m["per_class"]["covid"]
    assert covid["recall"] == pytest.approx(2 / 3)
    assert covid["specificity"] == pytest.approx(1.0)
    assert m["per_class"]["normal"]["precision"] == pytest.approx(2 / 3)
    assert m["per_class"]["normal"]["specificity"] == pytest.approx(3 / 4)
    assert list(m["per_class"]) == classes


def test_auc_is_none_when_a_class_is_absent() -> None:
    m = compute_metrics([0, 1, 0, 1], np.array([[0.9, 0.1, 0], [0.2, 0.8, 0], [0.6, 0.4, 0], [0.3, 0.7, 0]]),
                        ["a", "b", "c"])
    assert m["per_class"]["c"]["auc"] is None
    assert m["macro_auc"] == pytest.approx(1.0)
