"""Ground-truth check of the maps where lesion masks are known (the phantom, or any manifest with masks).

Over the abnormal images (those whose ``mask`` column names a non-empty lesion mask):

- pointing game: a hit when the map's maximum lies inside the lesion mask dilated by 5% of the image width;
- energy in lesion / lungs: the share of the map's total mass inside the (undilated) lesion mask and
  inside the lung mask (``lung_mask`` column, when present).

On a cxrnn phantom the result also carries ``lesion_removed``: the same abnormal cases re-rendered
without their lesion, classified again. It separates the two reasons a map can miss: when removing the
lesion flips the prediction to normal, the model does use the lesion and a miss is the attribution
method's failure, not a shortcut.

Chance levels are reported next to them: a map with its maximum at a uniformly random pixel hits with
probability (dilated lesion area / image area), and a flat map puts (mask area / image area) of its energy
in a mask. A map is only informative as far as it beats those.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image
from scipy import ndimage

from cxrnn.data.dataset import Dataset, Sample, load_dataset
from cxrnn.data.io import ImageReadError, read_image
from cxrnn.explain.cam import CamExplainer, ExplainInput, map_shape
from cxrnn.explain.counterfactual import lesion_removed_test
from cxrnn.models.bundle import ModelBundle
from cxrnn.utils.atomic import atomic_write_text

Progress = Callable[[int, int], None]
POINTING_TOLERANCE = 0.05  # of the image width, as in the definition of a hit


def read_mask(path: str | Path, shape: tuple[int, int]) -> np.ndarray:
    """A binary mask (any non-zero pixel is inside) resized with nearest neighbour to ``shape`` (H, W)."""
    try:
        with Image.open(path) as im:
            im.load()
            mask = np.asarray(im.convert("L")) > 0
    except (OSError, ValueError) as exc:
        raise ImageReadError(Path(path), f"unreadable mask ({type(exc).__name__}: {exc})") from exc
    if mask.shape != tuple(shape):
        resized = Image.fromarray(mask.astype(np.uint8) * 255).resize((shape[1], shape[0]), Image.NEAREST)
        mask = np.asarray(resized) > 0
    return mask


def dilate(mask: np.ndarray, radius: float) -> np.ndarray:
    """Every pixel within ``radius`` pixels (Euclidean) of the mask."""
    if radius <= 0 or not mask.any():
        return mask.copy()
    return ndimage.distance_transform_edt(~mask) <= radius


def score_map(cam: np.ndarray, lesion: np.ndarray, lungs: np.ndarray | None,
              tolerance: float = POINTING_TOLERANCE) -> dict[str, Any]:
    """Pointing-game hit and energy shares of one map against its masks (all at the same (H, W))."""
    radius = tolerance * cam.shape[1]
    near_lesion = dilate(lesion, radius)
    peak = np.unravel_index(int(np.argmax(cam)), cam.shape)
    total = float(cam.sum())
    return {
        "hit": bool(near_lesion[peak]),
        "peak_yx": [int(peak[0]), int(peak[1])],
        "energy_in_lesion": float(cam[lesion].sum() / total) if total > 0 else 0.0,
        "energy_in_lungs": (float(cam[lungs].sum() / total) if total > 0 else 0.0) if lungs is not None else None,
        "chance_hit": float(near_lesion.mean()),
        "lesion_area": float(lesion.mean()),
        "lungs_area": float(lungs.mean()) if lungs is not None else None,
    }


@dataclass
class _Case:
    sample: Sample
    lung_mask: Path | None


def _abnormal_cases(dataset: Dataset) -> list[_Case]:
    cases = []
    for s in dataset.samples:
        if s.mask is None:
            continue
        lung = s.extra.get("lung_mask") or None
        cases.append(_Case(s, (Path(lung) if Path(lung).is_absolute() else dataset.root / lung) if lung else None))
    return cases


def _mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


def _summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "n": len(rows),
        "hit_rate": _mean([float(r["hit"]) for r in rows]),
        "energy_in_lesion": _mean([r["energy_in_lesion"] for r in rows]),
        "energy_in_lungs": _mean([r["energy_in_lungs"] for r in rows]),
        "chance_hit_rate": _mean([r["chance_hit"] for r in rows]),
        "lesion_area_share": _mean([r["lesion_area"] for r in rows]),
        "lungs_area_share": _mean([r["lungs_area"] for r in rows]),
        "predicted_correctly": _mean([float(r["predicted"] == r["label"]) for r in rows]),
    }


def evaluate_explanations(
    bundle: ModelBundle,
    data: str | Path | Dataset,
    method: str = "gradcam",
    layer: str | None = None,
    target: str = "true",
    batch_size: int = 8,
    progress: Progress | None = None,
    warn: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Pointing game and energy shares over the images of ``data`` that have a non-empty lesion mask.

    ``target`` "true" explains each image's true class (the lesion's class), "predicted" the model's choice.
    Returns the summary dict (``hit_rate``, ``energy_in_lesion``, ``energy_in_lungs``, ``per_class``, ``n``, ...)
    with one row per image under ``images``.
    """
    if target not in ("true", "predicted"):
        raise ValueError(f"target must be 'true' or 'predicted', got {target!r}")
    dataset = data if isinstance(data, Dataset) else load_dataset(data, classes=bundle.classes)
    cases = _abnormal_cases(dataset)
    if not cases:
        raise ValueError(f"{dataset.root}: no images with a lesion mask (a 'mask' column in the manifest)")
    say = warn or (lambda m: None)
    rows: list[dict[str, Any]] = []
    errors: list[str] = []
    with CamExplainer(bundle, method=method, layer=layer, batch_size=batch_size) as explainer:
        for start in range(0, len(cases), batch_size):
            batch: list[tuple[_Case, ExplainInput, np.ndarray, np.ndarray | None]] = []
            for case in cases[start : start + batch_size]:
                try:
                    item = explainer.explain_input(read_image(case.sample.path))  # the full-size image is not kept
                    shape = map_shape(item.shape)  # masks are scored at the size the maps are kept at
                    lesion = read_mask(case.sample.mask, shape)  # type: ignore[arg-type]
                    lungs = read_mask(case.lung_mask, shape) if case.lung_mask else None
                except ImageReadError as err:
                    errors.append(str(err))
                    say(f"skipped {err}")
                    continue
                if lesion.any():  # an empty mask marks a normal image
                    batch.append((case, item, lesion, lungs))
            if batch:
                targets = [c.sample.label if target == "true" else None for c, _, _, _ in batch]
                maps = explainer.explain_arrays([img for _, img, _, _ in batch], target=targets)
                for (case, _, lesion, lungs), (cam, probs, _) in zip(batch, maps):
                    row = score_map(cam, lesion, lungs)
                    row.update(path=str(case.sample.path), label=case.sample.label,
                               predicted=bundle.classes[int(np.argmax(probs))])
                    rows.append(row)
            if progress:
                progress(min(start + batch_size, len(cases)), len(cases))
        layer_name = explainer.layer_name
    if not rows:
        raise ValueError(f"{dataset.root}: no readable image with a non-empty lesion mask")
    classes = [c for c in bundle.classes if any(r["label"] == c for r in rows)]
    summary = _summarise(rows)
    lesion_removed = lesion_removed_test(bundle, dataset)
    return {
        **summary,
        "per_class": {c: _summarise([r for r in rows if r["label"] == c]) for c in classes},
        "method": method,
        "layer": layer_name,
        "target": target,
        "tolerance": POINTING_TOLERANCE,
        "data": str(dataset.root),
        "lesion_removed": lesion_removed,
        "errors": errors,
        "images": rows,
    }


def write_explain_eval(result: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, json.dumps(result, indent=2))
