"""report.md: what was trained, on what, and how it scored — every number with its class name."""

from __future__ import annotations

from pathlib import Path
from typing import Any


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


def write_report(run_dir: str | Path, cfg: Any, result: Any, extra_sections: list[str] | None = None) -> Path:
    from cxrnn.utils.atomic import atomic_write_text

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
    lines += extra_sections or []
    lines += ["## Caveats", "",
              "Research use only, not a medical device. Accuracy on one split of one dataset says little about "
              "other hospitals: audit the data for duplicates and source shortcuts (`cxrnn audit`) before trusting it.", ""]
    return atomic_write_text(Path(run_dir) / "report.md", "\n".join(lines))
