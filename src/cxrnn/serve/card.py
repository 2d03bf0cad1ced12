"""The model card served at ``/v1/model``, in the spirit of a MONAI bundle's ``metadata.json``.

Everything in it is read from the model file (what it was trained on, what it scored on its held-out
test split, how it is calibrated); nothing is typed in by hand except the intended-use text.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from cxrnn import __version__
from cxrnn.utils.hashing import file_digest
from cxrnn.models.bundle import ModelBundle
from cxrnn.models.conformal import ConformalSets
from cxrnn.models.ood import OodStats

INTENDED_USE = (
    "Research and teaching: explore how a CNN->RNN network classifies frontal chest X-rays as "
    "COVID-19, pneumonia or normal, and where it looks (attribution maps). Not a medical device; not for "
    "diagnosis, triage or any clinical decision."
)
LIMITATIONS = [
    "Trained and tested only on the data summarised under training_data; performance on other hospitals, "
    "scanners, views (lateral, paediatric) or populations is unknown.",
    "Test metrics come from a single held-out split of that data; small test sets give wide intervals.",
    "Inputs far from the training images are flagged by the out-of-distribution gate, but an unflagged "
    "input is not guaranteed to be in distribution, and a flagged one still gets a (meaningless) label.",
    "Explanation maps show which regions drove the score, not where disease is; they can highlight "
    "text markers, borders or devices (shortcuts).",
    "Probabilities are softmax scores over the trained classes only: an image of any other condition is "
    "still forced into one of them.",
]


def wilson_interval(successes: float, n: int, z: float = 1.959964) -> tuple[float, float] | None:
    """95% Wilson score interval of a proportion (used for accuracy when the model stores no CI)."""
    if n <= 0:
        return None
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # At p = 0 or 1 the exact bound is p itself; rounding would otherwise leave p just outside.
    return max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half))


def held_out_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """The test-split scores the model file holds, with training's bootstrap intervals (``ci``); a model
    file without them gets a Wilson interval for accuracy, labelled as such."""
    out = {k: metrics[k] for k in ("n", "accuracy", "macro_f1", "macro_auc") if k in metrics}
    if "ci" in metrics:
        out["ci"] = metrics["ci"]
        return out
    n, acc = metrics.get("n"), metrics.get("accuracy")
    if isinstance(n, int) and isinstance(acc, (int, float)):
        interval = wilson_interval(acc * n, n)
        if interval:
            out["accuracy_ci95"] = {"low": interval[0], "high": interval[1], "method": "Wilson score interval"}
    return out


def calibration_card(bundle: ModelBundle) -> dict[str, Any]:
    block = bundle.metrics.get("calibration") or {}
    return {"temperature": bundle.temperature, "ece": bundle.metrics.get("ece"),
            "ece_before_temperature": block.get("ece_before"), "fitted_on": block.get("fitted_on"),
            "bins": 15, "note": "probabilities are softmax(logits / temperature); ECE on the test split, "
                                "after temperature scaling"}


def prediction_sets_card(bundle: ModelBundle) -> dict[str, Any] | None:
    """The conformal calibration the model file holds (coverage, which images), or None for a model
    trained before prediction sets."""
    sets = ConformalSets.from_extras(bundle.extras)
    if sets is None:
        return None
    return {"coverage": sets.coverage, "calibrated_on": sets.calibrated_on,
            "calibration_counts": dict(zip(sets.classes, sets.calibration_counts)), "warnings": list(sets.warnings),
            "method": "class-conditional (Mondrian) split-conformal, score 1 - p",
            "note": "each response's prediction_set holds every class not ruled out: an image of class k has k "
                    "in its set with probability >= coverage, for each class; refer is true when the set is "
                    "not exactly one class or the image is out of distribution"}


def model_identity(bundle: ModelBundle, model_path: str | Path) -> dict[str, str]:
    return {"name": f"cxrnn-{bundle.backbone_name}-{bundle.head_name}", "version": file_digest(model_path)[:12],
            "created": bundle.created}


def model_card(bundle: ModelBundle, model_path: str | Path, runtime: str) -> dict[str, Any]:
    identity = model_identity(bundle, model_path)
    ood = OodStats.from_extras(bundle.extras)
    size = bundle.preprocessing.input_size
    return {
        **identity,
        "schema": "cxrnn model card, modelled on MONAI bundle metadata.json",
        "cxrnn_version": __version__,
        "task": "chest X-ray classification (" + ", ".join(bundle.classes) + ")",
        "runtime": runtime,
        "network": {
            "backbone": {"name": bundle.backbone_name, "weights": bundle.weights_id,
                         "grad_cam_layer": bundle.target_layer},
            "head": {"name": bundle.head_name, "options": bundle.head_options},
            "feature_map": list(bundle.feature_hw),
        },
        "network_data_format": {
            "inputs": {"image": {"type": "image", "format": "PNG, JPEG or DICOM, any size (resized)",
                                 "modality": "CR/DX frontal chest X-ray", "num_channels": 1,
                                 "spatial_shape": [size, size], "value_range": [0, 1],
                                 "preprocessing": bundle.preprocessing.to_dict()}},
            "outputs": {"pred": {"type": "probabilities", "num_channels": len(bundle.classes),
                                 "channel_def": {str(i): c for i, c in enumerate(bundle.classes)}}},
        },
        "classes": bundle.classes,
        "training_data": bundle.extras.get("training_data", {}),
        "test_metrics": held_out_metrics(bundle.metrics),
        "calibration": calibration_card(bundle),
        "out_of_distribution": ood.summary() if ood else None,
        "prediction_sets": prediction_sets_card(bundle),
        "intended_use": INTENDED_USE,
        "limitations": LIMITATIONS,
        "training_config": {k: bundle.config.get(k) for k in ("optimizer", "lr", "epochs", "batch_size", "seed",
                                                             "test_size", "val_size", "finetune") if k in bundle.config},
        "model_file_format": bundle.format_version,
        "notes": list(bundle.notes),
    }
