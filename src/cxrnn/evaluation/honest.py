"""Training-time hooks for honest evaluation: duplicate-aware groups, temperature scaling, bootstrap CIs,
ECE with a reliability diagram, and leave-one-source-out evaluation."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from cxrnn.audit.duplicates import DEFAULT_ALIGN_THRESHOLD, combine_groups, duplicate_group_ids
from cxrnn.evaluation.bootstrap import bootstrap_ci
from cxrnn.evaluation.calibration import (calibration_summary, expected_calibration_error, fit_temperature,
                                          plot_reliability, softmax)

Log = Callable[[str], None]


def split_groups(paths: Sequence[str], manifest_groups: np.ndarray | None, dedup: bool, threshold: int,
                 cache_dir: str | Path | None, log: Log, align_threshold: float | None = DEFAULT_ALIGN_THRESHOLD
                 ) -> tuple[np.ndarray | None, dict[str, Any]]:
    """Groups for the splitter: duplicate groups (exact + near) united with the manifest groups."""
    info: dict[str, Any] = {"dedup": dedup}
    if not dedup:
        return manifest_groups, info
    ids, report = duplicate_group_ids(paths, threshold, cache_dir, align_threshold=align_threshold)
    info.update(duplicate_groups=len(report.groups), images_in_duplicate_groups=int(sum(len(g) for g in report.groups)),
                near_duplicate_threshold=threshold, align_threshold=report.align_threshold)
    if report.groups:
        log(f"{len(report.groups)} duplicate group(s) ({info['images_in_duplicate_groups']} images) kept on one side of every split")
    if not report.groups and manifest_groups is None:
        return None, info
    return combine_groups(ids, manifest_groups), info


def logits_of(head: torch.nn.Module, features: np.ndarray) -> np.ndarray:
    from cxrnn.training.loop import evaluate_logits

    if len(features) == 0:
        return np.zeros((0, 0))
    return evaluate_logits(head, torch.from_numpy(features)).numpy()


def calibrate(val_logits: np.ndarray, y_val: np.ndarray, test_logits: np.ndarray, y_test: np.ndarray
              ) -> tuple[float, np.ndarray, np.ndarray, dict[str, Any]]:
    """Fit T on validation logits; return (T, test probs before, after, the calibration block)."""
    before = softmax(test_logits)
    if len(val_logits) == 0:
        return 1.0, before, before, {"temperature": 1.0, "fitted_on": None,
                                     "ece_before": expected_calibration_error(before, y_test)}
    t = fit_temperature(val_logits, y_val)
    after = softmax(test_logits, t)
    block = {"temperature": t, "fitted_on": f"validation split ({len(y_val)} images)",
             "ece_before": expected_calibration_error(before, y_test),
             "ece_after": expected_calibration_error(after, y_test),
             "val_ece_before": expected_calibration_error(softmax(val_logits), y_val),
             "val_ece_after": expected_calibration_error(softmax(val_logits, t), y_val)}
    return t, before, after, block


def add_uncertainty(metrics: dict[str, Any], y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str],
                    out_dir: str | Path | None, n_boot: int, seed: int = 0,
                    before: np.ndarray | None = None) -> dict[str, Any]:
    """Add ``ci`` and ``ece`` (+ ``reliability``) to ``metrics``; draw reliability.png into ``out_dir``."""
    if n_boot > 0:
        metrics["ci"] = bootstrap_ci(y_true, probs, classes, n_boot, seed)
    summary = calibration_summary(probs, y_true)
    metrics["ece"] = summary["ece"]
    metrics["reliability"] = summary["reliability"]
    if out_dir is not None and len(y_true):
        plot_reliability(probs, y_true, Path(out_dir) / "reliability.png", before=before)
    return metrics


def ci_text(metrics: dict[str, Any], key: str) -> str:
    ci = metrics.get("ci", {}).get(key)
    if not ci or ci.get("low") is None:
        return ""
    return f" [{ci['low']:.3f}, {ci['high']:.3f}]"


def report_sections(metrics: dict[str, Any]) -> list[str]:
    """Markdown for report.md: confidence intervals, calibration, leave-one-source-out."""
    lines: list[str] = []
    if "ci" in metrics:
        ci = metrics["ci"]
        lines += [f"## {ci['level']:.0%} confidence intervals ({ci['n_boot']} bootstrap resamples of the test split)", "",
                  f"- accuracy {metrics['accuracy']:.3f}{ci_text(metrics, 'accuracy')}",
                  f"- macro F1 {metrics['macro_f1']:.3f}{ci_text(metrics, 'macro_f1')}"]
        if metrics.get("macro_auc") is not None:
            lines.append(f"- macro AUC {metrics['macro_auc']:.3f}{ci_text(metrics, 'macro_auc')}")
        lines += ["", "| class | recall | 95% CI | specificity | 95% CI |", "|---|---|---|---|---|"]
        for name, row in metrics["per_class"].items():
            c = ci["per_class"][name]
            fmt = lambda d: "n/a" if d["low"] is None else f"[{d['low']:.3f}, {d['high']:.3f}]"  # noqa: E731
            spec = row["specificity"]
            lines.append(f"| {name} | {row['recall']:.3f} | {fmt(c['recall'])} | "
                         f"{'n/a' if spec is None else f'{spec:.3f}'} | {fmt(c['specificity'])} |")
        lines.append("")
    cal = metrics.get("calibration")
    if cal:
        lines += ["## Calibration", "", f"temperature {cal['temperature']:.3f} (fitted on {cal['fitted_on'] or 'nothing: no validation split'}); "
                  f"test ECE (15 bins) before {cal['ece_before']:.3f}"
                  + (f", after {cal['ece_after']:.3f}" if "ece_after" in cal else ""), "", "![reliability](reliability.png)", ""]
    loso = metrics.get("leave_one_source_out")
    if loso:
        lines += ["## Leave one source out (train on the other sources, test on the held-out one)", "",
                  "| held-out source | n train | n test | accuracy | macro F1 | macro AUC |", "|---|---|---|---|---|---|"]
        for src, r in loso["sources"].items():
            auc = "n/a" if r["macro_auc"] is None else f"{r['macro_auc']:.3f}"
            lines.append(f"| {src} | {r['n_train']} | {r['n_test']} | {r['accuracy']:.3f}{ci_text(r, 'accuracy')} "
                         f"| {r['macro_f1']:.3f} | {auc} |")
        lines += ["", f"mean accuracy {loso['mean_accuracy']:.3f} ± {loso['std_accuracy']:.3f}", ""]
    return lines


def head_logits(head: torch.nn.Module, features, idx: np.ndarray) -> np.ndarray:
    """Logits of the rows ``idx`` of a feature matrix (array or memmap), batch by batch."""
    from cxrnn.features.matrix import FeatureRows
    from cxrnn.training.loop import rows_logits

    if len(idx) == 0:
        return np.zeros((0, 0))
    return rows_logits(head, FeatureRows(features, idx)).numpy()


def leave_one_source_out(sources: Sequence[str | None], labels: np.ndarray, features, groups: np.ndarray | None,
                         cfg: Any, new_network: Callable[[int], Any], classes: Sequence[str], log: Log,
                         ) -> dict[str, Any]:
    """Hold out each source in turn: train (fresh) on the others, calibrate on their validation part, test on it."""
    from cxrnn.data.splits import holdout
    from cxrnn.evaluation.metrics import compute_metrics
    from cxrnn.features.matrix import FeatureRows
    from cxrnn.training.loop import fit_head

    if any(s is None for s in sources):
        raise ValueError("--leave-one-source-out needs a source for every image (a manifest with a source column)")
    names = sorted(set(sources))  # type: ignore[arg-type]
    if len(names) < 2:
        raise ValueError(f"--leave-one-source-out needs at least two sources, found {len(names)}")
    src = np.array(sources)
    rows: dict[str, Any] = {}
    for k, name in enumerate(names):
        test = np.flatnonzero(src == name)
        rest = np.flatnonzero(src != name)
        try:
            train, val = holdout(labels, cfg.val_size, cfg.seed + 1, groups, candidates=rest)
        except ValueError:  # too few groups or a class too small for a stratified hold-out
            train, val = rest, rest[:0]
        net = new_network(cfg.seed + 100 + k)
        fit_head(net.head, FeatureRows(features, train), labels[train], FeatureRows(features, val), labels[val],
                 cfg, cfg.seed + 100 + k)
        t, _, probs, cal = calibrate(head_logits(net.head, features, val), labels[val],
                                     head_logits(net.head, features, test), labels[test])
        m = compute_metrics(labels[test], probs, classes)
        row = {"n_train": int(len(train)), "n_val": int(len(val)), "n_test": int(len(test)),
               "accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "macro_auc": m["macro_auc"],
               "per_class_recall": {c: m["per_class"][c]["recall"] for c in classes},
               "temperature": t, "ece": cal.get("ece_after", cal["ece_before"])}
        if cfg.bootstrap:
            row["ci"] = {key: v for key, v in bootstrap_ci(labels[test], probs, classes, cfg.bootstrap, cfg.seed).items()
                         if key in ("accuracy", "macro_f1", "macro_auc", "level", "n_boot")}
        rows[name] = row
        log(f"held out {name}: accuracy {row['accuracy']:.3f} on {len(test)} images")
    accs = [r["accuracy"] for r in rows.values()]
    return {"sources": rows, "mean_accuracy": float(np.mean(accs)),
            "std_accuracy": float(np.std(accs, ddof=1)) if len(accs) > 1 else 0.0}
