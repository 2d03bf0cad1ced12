"""Ground-truth and faithfulness checks of the maps where lesion masks are known (the phantom, or any
manifest with masks), for one or several methods on the same images.

Over the abnormal images (those whose ``mask`` column names a non-empty lesion mask):

- pointing game: a hit when the map's maximum lies inside the lesion mask dilated by 5% of the image
  width (``hit_rate``), and inside the mask itself (``hit_rate_strict``: CheXlocalize's rule, Saporta et
  al. 2022), each with a 95% bootstrap interval over the images, per class and overall;
- energy in lesion / lungs: the share of the map's total mass inside the (undilated) lesion mask and
  inside the lung mask (``lung_mask`` column, when present);
- deletion and insertion AUC (``cxrnn.explain.faithfulness``) of the explained class's probability,
  beside those of a random order of pixels and of feature-map cells on the same images: faithfulness to
  the model, not to the lesion;
- seconds per image of each method's maps (the backbone pass included).

On a cxrnn phantom the result also carries ``lesion_removed``: the same abnormal cases re-rendered
without their lesion, classified again. It separates the two reasons a map can miss: when removing the
lesion flips the prediction to normal, the model does use the lesion and a miss is the attribution
method's failure, not a shortcut.

Chance levels are reported next to them: a map with its maximum at a uniformly random pixel hits with
probability (dilated lesion area / image area), and a flat map puts (mask area / image area) of its energy
in a mask. A map is only informative as far as it beats those.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image
from scipy import ndimage

from cxrnn.data.dataset import Dataset, Sample, load_dataset
from cxrnn.data.io import ImageReadError, read_image
from cxrnn.evaluation.bootstrap import DEFAULT_BOOTSTRAP, percentile_interval, resample_counts
from cxrnn.explain.cam import CamExplainer, ExplainInput, map_shape
from cxrnn.explain.counterfactual import lesion_removed_test
from cxrnn.explain.faithfulness import DeletionInsertion
from cxrnn.explain.registry import CAM_METHODS, CURVE_STEPS, DEFAULT_EVAL_METHODS, METHODS
from cxrnn.models.bundle import ModelBundle
from cxrnn.models.preprocess import to_input_tensor
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
    """Pointing-game hits (within ``tolerance`` x the width of the lesion, and inside it) and energy shares
    of one map against its masks (all at the same (H, W))."""
    radius = tolerance * cam.shape[1]
    near_lesion = dilate(lesion, radius)
    peak = np.unravel_index(int(np.argmax(cam)), cam.shape)
    total = float(cam.sum())
    return {
        "hit": bool(near_lesion[peak]),
        "hit_strict": bool(lesion[peak]),
        "peak_yx": [int(peak[0]), int(peak[1])],
        "energy_in_lesion": float(cam[lesion].sum() / total) if total > 0 else 0.0,
        "energy_in_lungs": (float(cam[lungs].sum() / total) if total > 0 else 0.0) if lungs is not None else None,
        "chance_hit": float(near_lesion.mean()),
        "chance_hit_strict": float(lesion.mean()),
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


def rate_interval(hits: Sequence[bool], n_boot: int = DEFAULT_BOOTSTRAP, seed: int = 0) -> dict[str, float | None]:
    """95% percentile bootstrap interval of a hit rate over the images."""
    h = np.asarray(hits, dtype=np.float64)
    if len(h) == 0:
        return {"low": None, "high": None}
    return percentile_interval(resample_counts(len(h), n_boot, seed) @ h / len(h))


def _summarise(rows: list[dict[str, Any]], n_boot: int) -> dict[str, Any]:
    return {
        "n": len(rows),
        "hit_rate": _mean([float(r["hit"]) for r in rows]),
        "hit_rate_ci": rate_interval([r["hit"] for r in rows], n_boot),
        "hit_rate_strict": _mean([float(r["hit_strict"]) for r in rows]),
        "hit_rate_strict_ci": rate_interval([r["hit_strict"] for r in rows], n_boot),
        "energy_in_lesion": _mean([r["energy_in_lesion"] for r in rows]),
        "energy_in_lungs": _mean([r["energy_in_lungs"] for r in rows]),
        "deletion_auc": _mean([r.get("deletion_auc") for r in rows]),
        "insertion_auc": _mean([r.get("insertion_auc") for r in rows]),
        "chance_hit_rate": _mean([r["chance_hit"] for r in rows]),
        "chance_hit_rate_strict": _mean([r["chance_hit_strict"] for r in rows]),
        "lesion_area_share": _mean([r["lesion_area"] for r in rows]),
        "lungs_area_share": _mean([r["lungs_area"] for r in rows]),
        "predicted_correctly": _mean([float(r["predicted"] == r["label"]) for r in rows]),
    }


def parse_methods(methods: str | Sequence[str] | None) -> list[str]:
    """A comma-separated string or a list of method names ("all": every method), checked and deduplicated."""
    if methods is None:
        names = list(DEFAULT_EVAL_METHODS)
    elif isinstance(methods, str):
        names = [m.strip() for m in methods.split(",") if m.strip()]
    else:
        names = list(methods)
    if names == ["all"]:
        names = list(METHODS)
    unknown = [m for m in names if m not in METHODS]
    if unknown or not names:
        raise ValueError(f"unknown explanation method(s) {', '.join(unknown) or '(none given)'}: "
                         f"use one or more of {', '.join(METHODS)}, comma-separated, or 'all'")
    return list(dict.fromkeys(names))


@dataclass
class _Read:
    case: _Case
    item: ExplainInput
    lesion: np.ndarray
    lungs: np.ndarray | None


def evaluate_explanations(
    bundle: ModelBundle,
    data: str | Path | Dataset,
    methods: str | Sequence[str] | None = None,
    layer: str | None = None,
    target: str = "true",
    batch_size: int = 8,
    progress: Progress | None = None,
    warn: Callable[[str], None] | None = None,
    curve_steps: int = CURVE_STEPS,
    n_boot: int = DEFAULT_BOOTSTRAP,
    options: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Pointing game, energy shares, deletion / insertion AUC and speed of each method over the images of
    ``data`` that have a non-empty lesion mask, every image decoded once and explained by every method.

    ``methods``: names or a comma-separated string (default DEFAULT_EVAL_METHODS; "all" for every method);
    ``layer`` applies to the CAM methods; ``target`` "true" explains each image's true class (the lesion's
    class), "predicted" the model's choice; ``curve_steps`` 0 skips the deletion / insertion curves;
    ``options`` per method, as CamExplainer's. Returns ``{"methods": {name: summary}, "random": ...,
    "lesion_removed": ..., ...}``; each summary has ``per_class`` and one row per image under ``images``.
    """
    if target not in ("true", "predicted"):
        raise ValueError(f"target must be 'true' or 'predicted', got {target!r}")
    names = parse_methods(methods)
    dataset = data if isinstance(data, Dataset) else load_dataset(data, classes=bundle.classes)
    cases = _abnormal_cases(dataset)
    if not cases:
        raise ValueError(f"{dataset.root}: no images with a lesion mask (a 'mask' column in the manifest)")
    say = warn or (lambda m: None)
    rows: dict[str, list[dict[str, Any]]] = {m: [] for m in names}
    random_rows: list[dict[str, Any]] = []
    random_cell_rows: list[dict[str, Any]] = []
    seconds = {m: 0.0 for m in names}
    errors: list[str] = []
    curves = DeletionInsertion(bundle.net, bundle.preprocessing, bundle.temperature, curve_steps) if curve_steps else None
    with contextlib.ExitStack() as stack:
        explainers = {m: stack.enter_context(CamExplainer(
            bundle, method=m, layer=layer if m in CAM_METHODS else None, batch_size=batch_size,
            options=(options or {}).get(m))) for m in names}
        for start in range(0, len(cases), batch_size):
            batch = _read_batch(cases[start : start + batch_size], bundle.preprocessing, errors, say)
            if batch:
                targets = [r.case.sample.label if target == "true" else None for r in batch]
                x = to_input_tensor([r.item.model_image for r in batch], bundle.preprocessing) if curves else None
                for name, explainer in explainers.items():
                    began = time.perf_counter()
                    maps = explainer.explain_arrays([r.item for r in batch], target=targets)
                    seconds[name] += time.perf_counter() - began
                    for i, (read, (cam, probs, explained)) in enumerate(zip(batch, maps)):
                        row = score_map(cam, read.lesion, read.lungs)
                        row.update(path=str(read.case.sample.path), label=read.case.sample.label,
                                   predicted=bundle.classes[int(np.argmax(probs))])
                        if curves is not None:
                            row.update(curves.aucs(x[i : i + 1], cam, explained, seed=start + i))
                        rows[name].append(row)
                if curves is not None:
                    first = rows[names[0]][-len(batch):]
                    for i, (read, row) in enumerate(zip(batch, first)):
                        explained = bundle.classes.index(row["label"] if target == "true" else row["predicted"])
                        random_rows.append({"label": read.case.sample.label,
                                            **curves.random_aucs(x[i : i + 1], explained, seed=start + i)})
                        random_cell_rows.append({"label": read.case.sample.label,
                                                 **curves.random_aucs(x[i : i + 1], explained, seed=start + i,
                                                                      cells=tuple(bundle.feature_hw))})
            if progress:
                progress(min(start + batch_size, len(cases)), len(cases))
        layers = {m: e.layer_name for m, e in explainers.items()}
    if not rows[names[0]]:
        raise ValueError(f"{dataset.root}: no readable image with a non-empty lesion mask")
    classes = [c for c in bundle.classes if any(r["label"] == c for r in rows[names[0]])]
    summaries = {}
    for name in names:
        summaries[name] = {
            **_summarise(rows[name], n_boot),
            "per_class": {c: _summarise([r for r in rows[name] if r["label"] == c], n_boot) for c in classes},
            "layer": layers[name],
            "seconds_per_image": seconds[name] / len(rows[name]),
            "images": rows[name],
        }
    return {
        "methods": summaries,
        "random": _curve_summary(random_rows, classes),
        "random_cells": _curve_summary(random_cell_rows, classes),
        "n": len(rows[names[0]]),
        "target": target,
        "tolerance": POINTING_TOLERANCE,
        "curve_steps": curve_steps,
        "data": str(dataset.root),
        "lesion_removed": lesion_removed_test(bundle, dataset),
        "errors": errors,
    }


def _curve_summary(rows: list[dict[str, Any]], classes: list[str]) -> dict[str, Any] | None:
    """Mean deletion / insertion AUC of a random order, overall and per class (None without curves)."""
    if not rows:
        return None
    keys = ("deletion_auc", "insertion_auc")
    return {**{k: _mean([r[k] for r in rows]) for k in keys},
            "per_class": {c: {k: _mean([r[k] for r in rows if r["label"] == c]) for k in keys} for c in classes}}


def _read_batch(cases: list[_Case], preprocessing: Any, errors: list[str], say: Callable[[str], None]) -> list[_Read]:
    """Decode each case once, reduced at once to what the maps need; masks at the size maps are kept at."""
    batch = []
    for case in cases:
        try:
            item = ExplainInput.from_image(read_image(case.sample.path), preprocessing)
            shape = map_shape(item.shape)
            lesion = read_mask(case.sample.mask, shape)  # type: ignore[arg-type]
            lungs = read_mask(case.lung_mask, shape) if case.lung_mask else None
        except ImageReadError as err:
            errors.append(str(err))
            say(f"skipped {err}")
            continue
        if lesion.any():  # an empty mask marks a normal image
            batch.append(_Read(case, item, lesion, lungs))
    return batch


def _interval(summary: dict[str, Any], key: str) -> str:
    ci = summary.get(key) or {}
    if summary.get(key.removesuffix("_ci")) is None or ci.get("low") is None:
        return "-"
    return f"{summary[key.removesuffix('_ci')]:.3f} [{ci['low']:.3f}, {ci['high']:.3f}]"


def _number(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


COMPARISON_COLUMNS = ("method", "class", "n", "hit (5%) [95% CI]", "hit (0) [95% CI]", "chance (5%)",
                      "energy in lesion", "deletion AUC", "insertion AUC", "s / image")


def comparison_rows(result: dict[str, Any]) -> list[list[str]]:
    """The comparison table's rows: each method overall and per class, then the random order's AUCs."""
    out = []
    for name, summary in result["methods"].items():
        for cls, row in [*summary["per_class"].items(), ("all", summary)]:
            out.append([name, cls, str(row["n"]), _interval(row, "hit_rate_ci"), _interval(row, "hit_rate_strict_ci"),
                        _number(row["chance_hit_rate"]), _number(row["energy_in_lesion"]),
                        _number(row["deletion_auc"]), _number(row["insertion_auc"]),
                        _number(summary["seconds_per_image"], 3) if cls == "all" else ""])
    for key, label in (("random", "random order"), ("random_cells", "random cell order")):
        rnd = result.get(key)
        if rnd:
            for cls, row in [*rnd["per_class"].items(), ("all", rnd)]:
                out.append([label, cls, "", "", "", "", "", _number(row["deletion_auc"]),
                            _number(row["insertion_auc"]), ""])
    return out


def comparison_table(result: dict[str, Any]) -> list[str]:
    """The comparison as markdown table lines (header, rule, rows): explain_eval.md's and the CLI's."""
    return ["| " + " | ".join(cells) + " |"
            for cells in (COMPARISON_COLUMNS, ["---"] * len(COMPARISON_COLUMNS), *comparison_rows(result))]


def comparison_markdown(result: dict[str, Any]) -> str:
    """``explain_eval.md``: the comparison table, what its columns mean, and the lesion-removed check."""
    lines = [f"# Explanation check on {result['data']}", "",
             f"{result['n']} abnormal images; maps of the {result['target']} class. Hit: the map's maximum within "
             f"{result['tolerance']:.0%} of the image width of the lesion (5%), or inside it (0, CheXlocalize's "
             "rule); 95% bootstrap intervals over the images. Deletion / insertion AUC: the class probability as "
             f"pixels are removed / revealed in the map's order over {result['curve_steps']} steps (lower / higher "
             "is more faithful to the model). The references: a random order of single pixels, and a random order of "
             "the feature map's cells, which removes smooth blobs as the maps do (a map that beats the pixel order "
             "but not the cell order wins by the shape of what it removes, not by where).", "",
             *comparison_table(result)]
    removed = result.get("lesion_removed")
    if removed:
        lines += ["", f"Lesion removed: {removed['abnormal_rate_with_lesion']:.3f} of {removed['n_cases']} abnormal "
                      f"cases called abnormal with their lesion, {removed['still_abnormal_rate']:.3f} without it."]
    return "\n".join(lines) + "\n"


def write_explain_eval(result: dict[str, Any], path: str | Path) -> Path:
    """The result as JSON at ``path`` and its comparison table as ``explain_eval.md`` beside it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path.with_suffix(".md"), comparison_markdown(result))
    return atomic_write_text(path, json.dumps(result, indent=2))
