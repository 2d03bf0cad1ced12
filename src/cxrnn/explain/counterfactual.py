"""Counterfactual check on the phantom: the same abnormal cases rendered again without their lesion.

A model that still calls them covid/pneumonia reads something other than the lesion (a marker, the
hospital's style); one that then calls them normal does use the lesion. The explanation evaluation
(``cxrnn explain-eval``) reports it to tell a map's miss from a shortcut, and the audit turns it into a
verdict.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cxrnn.data.dataset import Dataset
from cxrnn.data.io import read_image
from cxrnn.data.phantom import ABNORMAL, phantom_cases, render_case
from cxrnn.models.bundle import ModelBundle


def lesion_removed_test(bundle: ModelBundle, dataset: Dataset, max_cases: int = 60, seed: int = 0
                        ) -> dict[str, Any] | None:
    """Share of lesion-free re-renders of abnormal phantom cases the model still calls abnormal, next to
    the share with the lesion and on true normals (at most ``max_cases`` of each, drawn with ``seed``).

    None when ``dataset`` is not a cxrnn phantom or the model has no normal or abnormal class."""
    from cxrnn.inference.predictor import Predictor

    found = phantom_cases(dataset)
    abnormal = [c for c in bundle.classes if c in ABNORMAL]
    if found is None or not abnormal or "normal" not in bundle.classes:
        return None
    cfg, rows = found
    rng = np.random.default_rng(seed)
    sick = [r for r in rows if r.sample.label in ABNORMAL]
    well = [r for r in rows if r.sample.label == "normal"]
    if not sick:
        return None
    sick = [sick[i] for i in rng.permutation(len(sick))[:max_cases]]
    well = [well[i] for i in rng.permutation(len(well))[:max_cases]]
    predictor = Predictor(bundle)
    normal_idx = bundle.classes.index("normal")
    erased = [render_case(r.case_seed, r.sample.label, cfg, source=r.source, lesion=False).image for r in sick]
    with_lesion = [read_image(r.sample.path) for r in sick]
    p_erased = predictor.predict_arrays(erased)
    p_lesion = predictor.predict_arrays(with_lesion)
    p_normal = predictor.predict_arrays([read_image(r.sample.path) for r in well]) if well else np.zeros((0, 1))
    still = float((p_erased.argmax(1) != normal_idx).mean())
    return {
        "n_cases": len(sick),
        "still_abnormal_rate": still,
        "abnormal_rate_with_lesion": float((p_lesion.argmax(1) != normal_idx).mean()),
        "abnormal_rate_on_true_normals": float((p_normal.argmax(1) != normal_idx).mean()) if len(well) else None,
        "mean_p_normal_after_erasing": float(p_erased[:, normal_idx].mean()),
    }
