"""Shared pieces of the command line: the app, consoles, progress bars, error lines, the metrics table."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, NoReturn

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Chest X-ray diagnosis (COVID-19 / pneumonia / normal) with a CNN->RNN network.")
console = Console(stderr=True)  # progress, warnings and errors: stdout stays parseable (predict --json)
out_console = Console()

STAGE_LABELS = {"extract": "extracting features", "epoch": "training epochs", "fold": "folds",
                "phantom": "generating phantom", "predict": "predicting", "evaluate": "evaluating",
                "explain": "explaining", "audit": "auditing"}

StageProgress = Callable[[str, int, int], None]


@contextmanager
def progress_bars() -> Iterator[StageProgress]:
    """A (stage, done, total) callback drawing one rich bar per stage."""
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console, transient=False) as bars:
        tasks: dict[str, Any] = {}

        def update(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bars.add_task(STAGE_LABELS.get(stage, stage), total=total)
            bars.update(tasks[stage], completed=done, total=total)

        yield update


def fail(message: str, code: int = 2) -> NoReturn:
    """One red error line on stderr, then exit with ``code``."""
    console.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def warn(message: str) -> None:
    console.print(f"[yellow]warning:[/yellow] {message}", highlight=False, soft_wrap=True)


def log(message: str) -> None:
    """The library's log callback: skipped files stand out as warnings, the rest is plain progress text."""
    if message.startswith("skipped "):
        warn(message)
    else:
        console.print(message, highlight=False)


def fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def print_metrics(metrics: dict[str, Any], title: str) -> None:
    table = Table(title=title)
    for col in ("class", "precision", "recall", "specificity", "F1", "AUC", "n"):
        table.add_column(col)
    for name, row in metrics["per_class"].items():
        table.add_row(name, fmt(row["precision"]), fmt(row["recall"]), fmt(row["specificity"]), fmt(row["f1"]),
                      fmt(row["auc"]), str(row["support"]))
    out_console.print(table)
    out_console.print(f"accuracy {fmt(metrics['accuracy'])}  macro F1 {fmt(metrics['macro_f1'])}  "
                      f"macro AUC {fmt(metrics['macro_auc'])}  (n={metrics['n']})")
