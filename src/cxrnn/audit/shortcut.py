"""Model-based shortcut checks: does the model (or its frozen features) use something other than the lungs?

- source probe: the frozen features, pooled, trained to predict the *source* instead of the label;
- marker energy (phantom with a burned-in marker): the share of Grad-CAM energy inside the marker box.

The third, lesion removed (abnormal phantom cases re-rendered without their lesion), is
``cxrnn.explain.counterfactual.lesion_removed_test``: the explanation evaluation reports it too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from cxrnn.data.dataset import Dataset
from cxrnn.models.bundle import ModelBundle


def source_probe(bundle: ModelBundle, dataset: Dataset, cache_dir: str | Path | None = None,
                 seed: int = 0, digests: Sequence[str | None] | None = None) -> dict[str, Any] | None:
    """Cross-validated accuracy of predicting ``source`` from the model's pooled frozen features
    (``digests``: the files' sha256, when the caller has read them already)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from cxrnn.audit.metadata import chance_accuracy
    from cxrnn.features.store import FeatureStore

    sources = [s.source for s in dataset.samples]
    if any(s is None for s in sources) or len(set(sources)) < 2:
        return None
    store = FeatureStore(bundle.net.backbone, cache_dir)
    fs = store.extract([s.path for s in dataset.samples], digests=digests)
    x = fs.features.mean(axis=(2, 3))
    names = sorted(set(sources))
    y = np.array([names.index(sources[i]) for i in fs.kept])
    folds = min(5, int(np.bincount(y).min()))
    if folds < 2:
        return None
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=0.1))
    pred = cross_val_predict(clf, x, y, cv=StratifiedKFold(folds, shuffle=True, random_state=seed))
    accuracy = float((pred == y).mean())
    chance = chance_accuracy(y)
    return {"accuracy": accuracy, "chance": chance, "skill": (accuracy - chance) / (1 - chance),
            "sources": names, "n": int(len(y)), "folds": folds}


def marker_energy(bundle: ModelBundle, dataset: Dataset, max_cases: int = 24, seed: int = 0) -> dict[str, Any] | None:
    """Share of Grad-CAM energy (predicted class) inside the phantom's burned-in marker box."""
    import torch
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from cxrnn.data.phantom import phantom_cases, render_case
    from cxrnn.models.preprocess import to_input_tensor

    found = phantom_cases(dataset)
    if found is None:
        return None
    cfg, rows = found
    marked = [r for r in rows if r.sample.extra.get("marker") == "1"]
    if not marked:
        return None
    rng = np.random.default_rng(seed)
    marked = [marked[i] for i in rng.permutation(len(marked))[:max_cases]]
    net = bundle.net.eval()
    fractions, areas = [], []
    with GradCAM(model=net, target_layers=[net.backbone.target_layer()]) as cam:
        for s, case_seed, src in marked:
            case = render_case(case_seed, s.label, cfg, source=src)
            if case.marker_box is None:
                continue
            x = to_input_tensor([case.image], bundle.preprocessing)
            with torch.no_grad():
                pred = int(net(x).argmax(1))
            with torch.enable_grad():
                heat = cam(input_tensor=x, targets=[ClassifierOutputTarget(pred)])[0]
            # The marker box is in image pixels; the CAM is at the network's input size.
            sy, sx = heat.shape[0] / case.image.shape[0], heat.shape[1] / case.image.shape[1]
            y0, x0, y1, x1 = case.marker_box
            box = heat[int(y0 * sy):max(int(y0 * sy) + 1, round(y1 * sy)),
                       int(x0 * sx):max(int(x0 * sx) + 1, round(x1 * sx))]
            total = float(heat.sum())
            if total <= 0:
                continue
            fractions.append(float(box.sum()) / total)
            areas.append(box.size / heat.size)
    if not fractions:
        return None
    mean_fraction, mean_area = float(np.mean(fractions)), float(np.mean(areas))
    return {"n_cases": len(fractions), "energy_fraction": mean_fraction, "area_fraction": mean_area,
            "enrichment": mean_fraction / mean_area if mean_area else None}
