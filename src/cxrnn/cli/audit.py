"""``cxrnn audit``: duplicates, label conflicts, metadata and source shortcuts of a dataset."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from cxrnn.audit.thresholds import DEFAULT_ALIGN_THRESHOLD, DEFAULT_THRESHOLD
from cxrnn.cli.common import app, fail, log, not_a_file, out_console, outside_paths, progress_bars
from cxrnn.cli.options import config_help, config_range

STATUS_COLOURS = {"ok": "green", "warning": "yellow", "fail": "red", "skipped": "dim"}


@app.command()
def audit(
    data: str = typer.Argument(..., help="Dataset folder (ROOT/<class>/...) or CSV manifest."),
    out: Path = typer.Option(Path("audit"), help="Folder for audit.json and audit.md."),
    model: Optional[Path] = typer.Option(None, help="model.pt: adds the source probe and (phantom) shortcut tests."),
    threshold: int = typer.Option(DEFAULT_THRESHOLD, help="Near-duplicate threshold in pHash bits (of 256).",
                                  callback=config_range("near_duplicate_threshold")),
    align_threshold: float = typer.Option(DEFAULT_ALIGN_THRESHOLD, help="Band-pass NCC after alignment for shifted, "
                                          "cropped or rotated copies (0: off).", callback=config_range("align_threshold")),
    cache_dir: Optional[str] = typer.Option(None, help="Cache folder for hashes and features."),
    seed: int = typer.Option(0, callback=config_range("seed")),
    allow_outside_paths: bool = typer.Option(False, "--allow-outside-paths", help=config_help("allow_outside_paths")),
) -> None:
    """Audit a dataset: duplicates, label conflicts, metadata and source shortcuts; a verdict per check."""
    from cxrnn.audit import run_audit

    not_a_file(out)
    try:
        with progress_bars() as bars:
            result = run_audit(data, out, model, threshold, cache_dir, seed, progress=bars, log=log,
                               align_threshold=align_threshold, **outside_paths(allow_outside_paths))
    except (ValueError, FileNotFoundError) as exc:
        fail(str(exc))
    table = Table(title=f"audit of {data}: {result['verdict'].upper()}")
    for col in ("check", "status", "detail"):
        table.add_column(col)
    for name, c in result["checks"].items():
        table.add_row(name, f"[{STATUS_COLOURS[c['status']]}]{c['status']}[/]", c["detail"])
    out_console.print(table)
    out_console.print(f"wrote {out / 'audit.json'} and {out / 'audit.md'}")
