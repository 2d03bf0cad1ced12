"""Audit and comparison commands: ``cxrnn audit`` and ``cxrnn compare``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from cxrnn.cli.common import app, fail, log, out_console, progress_bars


@app.command()
def audit(
    data: str = typer.Argument(..., help="Dataset folder (ROOT/<class>/...) or CSV manifest."),
    out: Path = typer.Option(Path("audit"), help="Folder for audit.json and audit.md."),
    model: Optional[Path] = typer.Option(None, help="model.pt: adds the source probe and (phantom) shortcut tests."),
    threshold: int = typer.Option(12, help="Near-duplicate threshold in pHash bits (of 256)."),
    align_threshold: float = typer.Option(0.9, help="Band-pass NCC after alignment for shifted, cropped or rotated copies (0: off)."),
    cache_dir: Optional[str] = typer.Option(None, help="Cache folder for hashes and features."),
    seed: int = typer.Option(0),
) -> None:
    """Audit a dataset: duplicates, label conflicts, metadata and source shortcuts; a verdict per check."""
    from cxrnn.audit import run_audit

    try:
        with progress_bars() as bars:
            result = run_audit(data, out, model, threshold, cache_dir, seed, progress=bars, log=log,
                               align_threshold=align_threshold)
    except (ValueError, FileNotFoundError) as exc:
        fail(str(exc))
    table = Table(title=f"audit of {data}: {result['verdict'].upper()}")
    for col in ("check", "status", "detail"):
        table.add_column(col)
    colour = {"ok": "green", "warning": "yellow", "fail": "red", "skipped": "dim"}
    for name, c in result["checks"].items():
        table.add_row(name, f"[{colour[c['status']]}]{c['status']}[/]", c["detail"])
    out_console.print(table)
    out_console.print(f"wrote {out / 'audit.json'} and {out / 'audit.md'}")


@app.command()
def compare(
    data: str = typer.Option(..., help="Dataset folder or CSV manifest."),
    backbones: str = typer.Option("vgg19,densenet121,inception_v3,inception_resnet_v2", help="Comma-separated backbones."),
    heads: str = typer.Option("lstm,pool", help="Comma-separated heads."),
    weights: str = typer.Option("imagenet", help="imagenet, none or a local state-dict file."),
    out: Path = typer.Option(Path("runs/compare"), help="Output folder."),
    config: Optional[Path] = typer.Option(None, help="YAML with training options shared by every pair."),
    preset: Optional[str] = typer.Option(None, help="Training preset shared by every pair (e.g. paper)."),
    epochs: Optional[int] = typer.Option(None),
    seed: Optional[int] = typer.Option(None),
    bootstrap: Optional[int] = typer.Option(None, help="Bootstrap resamples for the intervals (default 1000)."),
    cache_dir: Optional[str] = typer.Option(None, help="Feature cache folder."),
) -> None:
    """Train every backbone x head pair on the same split; write compare.md, compare.csv and compare.png."""
    from cxrnn.training.compare import compare as run_compare
    from cxrnn.training.config import resolve_config

    try:
        cfg = resolve_config(dict(data=data, weights=weights, epochs=epochs, seed=seed, bootstrap=bootstrap,
                                  cache_dir=cache_dir), config, preset)
        with progress_bars() as bars:
            rows = run_compare(cfg, [b.strip() for b in backbones.split(",") if b.strip()],
                               [h.strip() for h in heads.split(",") if h.strip()], out, progress=bars, log=log)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        fail(str(exc))
    table = Table(title="comparison (test split)")
    for col in ("backbone", "head", "accuracy", "F1", "AUC", "ECE", "ms/image"):
        table.add_column(col)
    f = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    for r in rows:
        table.add_row(r["backbone"], r["head"], f(r["accuracy"]), f(r["macro_f1"]), f(r["macro_auc"]), f(r["ece"]),
                      f"{r['inference_ms_per_image']:.1f}")
    out_console.print(table)
    out_console.print(f"wrote {out / 'compare.md'}, {out / 'compare.csv'} and {out / 'compare.png'}")
