"""``cxrnn compare``: every backbone x head pair trained on the same split, one honest results table.

Each pair is an ordinary ``train`` run (same seed and data, hence the same duplicate-aware split; the
feature cache is shared, so a backbone's features are extracted once for all its heads).
"""

from __future__ import annotations

import csv
import io
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from cxrnn.utils.atomic import atomic_write_text
from cxrnn.training.config import TrainConfig

Log = Callable[[str], None]
COLUMNS = ["backbone", "head", "accuracy", "accuracy_low", "accuracy_high", "macro_precision", "macro_recall",
           "macro_f1", "macro_f1_low", "macro_f1_high", "macro_auc", "macro_auc_low", "macro_auc_high", "ece",
           "train_seconds", "extract_seconds", "inference_ms_per_image", "parameters", "trainable_parameters", "n_test"]


def _inference_ms(model_path: Path, paths: Sequence[str], max_images: int = 32) -> tuple[float, int, int]:
    """End-to-end ms per image (read, preprocess, backbone, head) and the parameter counts."""
    from cxrnn.inference.predictor import Predictor

    predictor = Predictor.from_file(model_path)
    sample = list(paths)[:max_images]
    predictor.predict_paths(sample[:2])  # warm-up: first calls allocate
    t0 = time.perf_counter()
    predictor.predict_paths(sample)
    ms = (time.perf_counter() - t0) * 1000 / max(1, len(sample))
    net = predictor.bundle.net
    total = sum(p.numel() for p in net.parameters())
    trainable = sum(p.numel() for p in net.head.parameters())
    return ms, total, trainable


def compare(base: TrainConfig, backbones: Sequence[str], heads: Sequence[str], out: str | Path,
            progress=None, log: Log | None = None) -> list[dict[str, Any]]:
    """Train each pair under ``out/<backbone>-<head>/``; write compare.csv, compare.md and compare.png."""
    from cxrnn.training import train

    log = log or (lambda msg: None)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    splits = set()
    for backbone in backbones:
        for head in heads:
            log(f"== {backbone} + {head}")
            cfg = replace(base, backbone=backbone, head=head, out=str(out / f"{backbone}-{head}"),
                          leave_one_source_out=False)
            result = train(cfg, progress=progress, log=log)
            m = result.metrics
            splits.add(tuple(sorted((k, str(v)) for k, v in m["split"].items())))
            test_paths = [line.split(",")[0] for line in (result.run_dir / "predictions.csv").read_text().splitlines()[1:]]
            ms, params, trainable = _inference_ms(result.model_path, test_paths)
            ci = m.get("ci", {})
            per = m["per_class"].values()
            rows.append({
                "backbone": backbone, "head": head, "accuracy": m["accuracy"],
                "accuracy_low": ci.get("accuracy", {}).get("low"), "accuracy_high": ci.get("accuracy", {}).get("high"),
                "macro_precision": float(np.mean([r["precision"] for r in per])),
                "macro_recall": float(np.mean([r["recall"] for r in per])),
                "macro_f1": m["macro_f1"], "macro_f1_low": ci.get("macro_f1", {}).get("low"),
                "macro_f1_high": ci.get("macro_f1", {}).get("high"), "macro_auc": m["macro_auc"],
                "macro_auc_low": ci.get("macro_auc", {}).get("low"), "macro_auc_high": ci.get("macro_auc", {}).get("high"),
                "ece": m.get("ece"), "train_seconds": result.timings.get("fit_s"),
                "extract_seconds": result.timings.get("extract_s"), "inference_ms_per_image": ms,
                "parameters": params, "trainable_parameters": trainable, "n_test": m["n"],
            })
    if len(splits) != 1:
        raise RuntimeError("the pairs were not trained on the same split (a backbone could not read some files?)")
    write_compare(rows, out, base.bootstrap)
    return rows


def _f(v: Any, digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def write_compare(rows: list[dict[str, Any]], out: Path, n_boot: int) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / "compare.csv", buf.getvalue())
    ci = lambda r, k: f"{_f(r[k])} [{_f(r[k + '_low'])}, {_f(r[k + '_high'])}]" if r[k + "_low"] is not None else _f(r[k])  # noqa: E731
    lines = ["# Backbone x head comparison (same split, same seed)", "",
             f"Intervals: 95% percentile bootstrap over the test images ({n_boot} resamples). Precision and recall "
             "are macro averages; ECE after temperature scaling (15 bins). Training seconds: head fitting on cached "
             "features; inference: end to end per image on this machine's CPU.", "",
             "| backbone | head | accuracy | precision | recall | F1 | AUC | ECE | train s | extract s | ms/image | parameters |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['backbone']} | {r['head']} | {ci(r, 'accuracy')} | {_f(r['macro_precision'])} | "
                     f"{_f(r['macro_recall'])} | {ci(r, 'macro_f1')} | {ci(r, 'macro_auc')} | {_f(r['ece'])} | "
                     f"{_f(r['train_seconds'], 1)} | {_f(r['extract_seconds'], 1)} | {_f(r['inference_ms_per_image'], 1)} | "
                     f"{r['parameters']:,} ({r['trainable_parameters']:,} trained) |")
    lines += ["", "Rows with head `pool` answer \"does the RNN help?\": compare them with the same backbone's RNN rows, "
              "and look at whether the intervals overlap before believing a difference.", "", "![comparison](compare.png)", ""]
    atomic_write_text(out / "compare.md", "\n".join(lines))
    _plot(rows, out / "compare.png")


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    from cxrnn.evaluation.plots import plt, save_figure

    metrics = [("accuracy", "accuracy"), ("macro_f1", "macro F1"), ("macro_auc", "macro AUC")]
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(rows) + 2), 4))
    width = 0.8 / len(metrics)
    x = np.arange(len(rows))
    for k, (key, label) in enumerate(metrics):
        vals = np.array([r[key] if r[key] is not None else np.nan for r in rows], dtype=float)
        lo = np.array([r[key + "_low"] if r[key + "_low"] is not None else v for r, v in zip(rows, vals)], dtype=float)
        hi = np.array([r[key + "_high"] if r[key + "_high"] is not None else v for r, v in zip(rows, vals)], dtype=float)
        ax.bar(x + (k - 1) * width, vals, width, yerr=[vals - lo, hi - vals], capsize=3, label=label)
    ax.set_xticks(x, [f"{r['backbone']}\n+{r['head']}" for r in rows], fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("test score (95% CI)")
    ax.legend(fontsize=8)
    save_figure(fig, path)
