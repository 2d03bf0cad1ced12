"""report.md: what was trained, on what, and how it scored — every number with its class name."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cxrnn.utils.atomic import atomic_write_text


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def metrics_table(metrics: dict[str, Any]) -> list[str]:
    lines = ["| class | precision | recall (sensitivity) | specificity | F1 | AUC | support |",
             "|---|---|---|---|---|---|---|"]
    for name, row in metrics["per_class"].items():
        lines.append(f"| {name} | {_fmt(row['precision'])} | {_fmt(row['recall'])} | {_fmt(row['specificity'])} "
                     f"| {_fmt(row['f1'])} | {_fmt(row['auc'])} | {row['support']} |")
    return lines


def confusion_table(metrics: dict[str, Any]) -> list[str]:
    classes = metrics["classes"]
    lines = ["| true \\ predicted | " + " | ".join(classes) + " |", "|---" * (len(classes) + 1) + "|"]
    for name, row in zip(classes, metrics["confusion_matrix"]):
        lines.append(f"| {name} | " + " | ".join(str(v) for v in row) + " |")
    return lines


def ci_text(metrics: dict[str, Any], key: str) -> str:
    ci = metrics.get("ci", {}).get(key)
    if not ci or ci.get("low") is None:
        return ""
    return f" [{ci['low']:.3f}, {ci['high']:.3f}]"


def _share(value: Any) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def _estimate(entry: dict[str, Any]) -> str:
    if entry.get("estimate") is None:
        return "n/a"
    ci = f" [{entry['low']:.3f}, {entry['high']:.3f}]" if entry.get("low") is not None else ""
    return f"{entry['estimate']:.3f}{ci}"


def prediction_set_section(conformal: dict[str, Any] | None) -> list[str]:
    """The "Prediction sets" section: target and empirical coverage per class, set sizes, referral."""
    if not conformal:
        return []
    if "note" in conformal and "coverage" not in conformal:
        return ["## Prediction sets", "", conformal["note"], ""]
    target = conformal["target_coverage"]
    lines = ["## Prediction sets", "",
             f"Each image gets the set of classes the model cannot rule out at coverage {target:g}, class by class "
             f"(class-conditional conformal): an image of any class should have its class in the set at least "
             f"{target:.0%} of the time. Calibrated on the {conformal['calibrated_on']}; measured on the "
             f"{conformal['evaluated_on']}" + (f", 95% intervals from {conformal['ci']['n_boot']} bootstrap resamples"
                                               if conformal.get("ci", {}).get("n_boot") else "") + ".", "",
             "| class | calibration images | threshold on 1 - p | empirical coverage | 95% CI | test images |",
             "|---|---|---|---|---|---|"]
    fmt_ci = lambda e: "n/a" if e.get("low") is None else f"[{e['low']:.3f}, {e['high']:.3f}]"  # noqa: E731
    for name, row in conformal["per_class"].items():
        t = conformal["thresholds"][name]
        lines.append(f"| {name} | {conformal['calibration_counts'][name]} | "
                     f"{'in every set' if t is None else f'{t:.3f}'} | {_fmt(row['estimate'])} | {fmt_ci(row)} | {row['n']} |")
    overall = conformal["coverage"]
    lines.append(f"| all | {sum(conformal['calibration_counts'].values())} | | {_fmt(overall['estimate'])} | "
                 f"{fmt_ci(overall)} | {overall['n']} |")
    sizes, op = conformal["set_sizes"], conformal["operating_point"]
    lines += ["",
              f"- mean set size {_fmt(conformal['mean_set_size'])}; singleton {_share(sizes['singleton'])}, "
              f"more than one class {_share(sizes['multiple'])}, empty {_share(sizes['empty'])}",
              f"- accuracy on singleton sets {_estimate(conformal['singleton_accuracy'])}",
              f"- referral (refer unless the set is exactly the top class): {_share(op['referred'])} referred, "
              f"accuracy of the kept {_fmt(op['kept_accuracy'])}"]
    lines += [f"- warning: {w}" for w in conformal.get("warnings", [])]
    lines += ["", "![risk-coverage](risk_coverage.png)", ""]
    return lines


def report_sections(metrics: dict[str, Any]) -> list[str]:
    """Markdown for report.md: confidence intervals, calibration, prediction sets, leave-one-source-out."""
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
    lines += prediction_set_section(metrics.get("conformal"))
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


def write_report(run_dir: str | Path, cfg: Any, result: Any) -> Path:
    """report.md of a run: set-up, test metrics, folds, training, skipped files, intervals, calibration,
    leave-one-source-out. Every run writes the same sections from the same metrics."""
    m = result.metrics
    lines = [
        f"# cxrnn run: {cfg.backbone} + {cfg.head} head",
        "",
        f"- data: `{cfg.data}`; split seed {cfg.seed}; test share {cfg.test_size:.0%}"
        + (f", {cfg.folds}-fold CV on the rest" if cfg.folds else f", validation share {cfg.val_size:.0%} of the rest"),
        f"- weights: {cfg.weights}; mode: {'fine-tuned end to end' if cfg.finetune else 'frozen backbone, head trained on cached features'}",
        f"- optimiser {cfg.optimizer}, lr {cfg.lr:g} ({cfg.lr_schedule}), batch {cfg.batch_size}, "
        f"up to {cfg.epochs} epochs, patience {cfg.patience or 'off'}" + (f", preset {cfg.preset}" if cfg.preset else ""),
        f"- split sizes: {m.get('split', {})}",
        "",
        "## Held-out test split",
        "",
        f"accuracy **{_fmt(m['accuracy'])}**, macro F1 {_fmt(m['macro_f1'])}, macro AUC {_fmt(m['macro_auc'])} (n = {m['n']})",
        "",
        *metrics_table(m),
        "",
        "Confusion matrix (rows: true class, columns: predicted):",
        "",
        *confusion_table(m),
        "",
        "![confusion matrix](confusion_matrix.png) ![ROC](roc.png)",
        "",
    ]
    if getattr(result, "folds", None):
        lines += ["## Cross-validation (folds from the non-test part only, each trained from scratch)", "",
                  "| fold | n train | n val | best epoch | val acc | val macro F1 | test acc |", "|---|---|---|---|---|---|---|"]
        for r in result.folds:
            lines.append(f"| {r['fold']} | {r['n_train']} | {r['n_val']} | {r['best_epoch']} | {_fmt(r['val']['accuracy'])} "
                         f"| {_fmt(r['val']['macro_f1'])} | {_fmt(r['test']['accuracy'])} |")
        for key, stat in m.get("cv", {}).items():
            lines.append(f"- {key}: {stat['mean']:.3f} ± {stat['std']:.3f}")
        lines.append("")
    if result.history:
        last = result.history[-1]
        lines += ["## Training", "", f"{len(result.history)} epochs run; final train loss {_fmt(last.get('train_loss'))}, "
                  f"val loss {_fmt(last.get('val_loss'))}. Timings: "
                  + ", ".join(f"{k} {v:.1f}" for k, v in result.timings.items()), ""]
    if result.skipped:
        lines += ["## Skipped files", "", *[f"- {s}" for s in result.skipped[:50]], ""]
    lines += report_sections(m)
    lines += ["## Caveats", "",
              "Research use only, not a medical device. Accuracy on one split of one dataset says little about "
              "other hospitals: audit the data for duplicates and source shortcuts (`cxrnn audit`) before trusting it.", ""]
    return atomic_write_text(Path(run_dir) / "report.md", "\n".join(lines))
