"""Model-based shortcut checks: does the model (or its frozen features) use something other than the lungs?

- source probe: the frozen features, pooled, trained to predict the *source* instead of the label;
- lesion removed (phantom only): abnormal cases re-rendered without their lesion — a model that still
  calls them covid/pneumonia is reading something else;
- marker energy (phantom with a burned-in marker): the share of Grad-CAM energy inside the marker box.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from cxrnn.data.dataset import Dataset
from cxrnn.models.bundle import ModelBundle

ABNORMAL = ("covid", "pneumonia")


def source_probe(bundle: ModelBundle, dataset: Dataset, cache_dir: str | Path | None = None,
                 seed: int = 0) -> dict[str, Any] | None:
    """Cross-validated accuracy of predicting ``source`` from the model's pooled frozen features."""
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
    fs = store.extract([s.path for s in dataset.samples])
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


def _phantom_cases(dataset: Dataset):
    """(PhantomConfig, [(sample, case_seed, source_index)]) when ``dataset`` is a cxrnn phantom, else None."""
    from cxrnn.data.phantom import load_phantom_config

    meta = Path(dataset.root) / "phantom.json"
    if not meta.is_file() or any("case_seed" not in s.extra for s in dataset.samples):
        return None
    cfg = load_phantom_config(meta)
    rows = []
    for s in dataset.samples:
        m = re.search(r"(\d+)$", s.source or "0")
        rows.append((s, int(s.extra["case_seed"]), int(m.group(1)) if m else 0))
    return cfg, rows


def lesion_removed_test(bundle: ModelBundle, dataset: Dataset, max_cases: int = 60, seed: int = 0
                        ) -> dict[str, Any] | None:
    """Share of lesion-free re-renders of abnormal phantom cases the model still calls abnormal."""
    from cxrnn.data.io import read_image
    from cxrnn.data.phantom import render_case
    from cxrnn.inference.predictor import Predictor

    found = _phantom_cases(dataset)
    abnormal = [c for c in bundle.classes if c in ABNORMAL]
    if found is None or not abnormal or "normal" not in bundle.classes:
        return None
    cfg, rows = found
    rng = np.random.default_rng(seed)
    sick = [r for r in rows if r[0].label in ABNORMAL]
    well = [r for r in rows if r[0].label == "normal"]
    if not sick:
        return None
    sick = [sick[i] for i in rng.permutation(len(sick))[:max_cases]]
    well = [well[i] for i in rng.permutation(len(well))[:max_cases]]
    predictor = Predictor(bundle)
    normal_idx = bundle.classes.index("normal")
    erased = [render_case(seed_, s.label, cfg, source=src, lesion=False).image for s, seed_, src in sick]
    with_lesion = [read_image(s.path) for s, _, _ in sick]
    p_erased = predictor.predict_arrays(erased)
    p_lesion = predictor.predict_arrays(with_lesion)
    p_normal = predictor.predict_arrays([read_image(s.path) for s, _, _ in well]) if well else np.zeros((0, 1))
    still = float((p_erased.argmax(1) != normal_idx).mean())
    return {
        "n_cases": len(sick),
        "still_abnormal_rate": still,
        "abnormal_rate_with_lesion": float((p_lesion.argmax(1) != normal_idx).mean()),
        "abnormal_rate_on_true_normals": float((p_normal.argmax(1) != normal_idx).mean()) if len(well) else None,
        "mean_p_normal_after_erasing": float(p_erased[:, normal_idx].mean()),
    }


def marker_energy(bundle: ModelBundle, dataset: Dataset, max_cases: int = 24, seed: int = 0) -> dict[str, Any] | None:
    """Share of Grad-CAM energy (predicted class) inside the phantom's burned-in marker box."""
    import torch
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from cxrnn.data.phantom import render_case
    from cxrnn.models.preprocess import to_input_tensor

    found = _phantom_cases(dataset)
    if found is None:
        return None
    cfg, rows = found
    marked = [r for r in rows if r[0].extra.get("marker") == "1"]
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
