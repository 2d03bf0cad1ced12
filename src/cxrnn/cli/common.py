"""Shared pieces of the command line: the app, consoles, progress bars, error lines, the metrics table."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
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


Number = TypeVar("Number", int, float)


def printable(text: str) -> str:
    """``text`` on one line and free of rich markup: control characters (a newline in a file name) are
    escaped as repr does, so one file is always one line of output."""
    return escape("".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text)))


def in_range(bounds: Any) -> Callable[[Number | None], Number | None]:
    """A typer callback enforcing ``bounds`` (a ``cxrnn.training.config.Bounds``): a bad value is a usage
    error (exit 2) with the same wording as the API's ValueError. None (an option not given) passes."""

    def check(value: Number | None) -> Number | None:
        if value is not None and not bounds.contains(value):
            raise typer.BadParameter(f"must be {bounds}, not {value!r}")
        return value

    return check


def fail(message: str, code: int = 2) -> NoReturn:
    """One red error line on stderr, then exit with ``code``."""
    console.print(f"[red]error:[/red] {printable(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def warn(message: str) -> None:
    console.print(f"[yellow]warning:[/yellow] {printable(message)}", highlight=False, soft_wrap=True)


ACCEPT_NON_CHEST_HELP = (
    "Read DICOM objects that are not chest radiographs (Modality other than CR/DX/DR, BodyPartExamined other "
    "than chest) instead of refusing them; the reason is printed as a warning with the result.")


def acquisition_policy(accept_non_chest: bool) -> str:
    """The reader's policy (``cxrnn.data.dicom``) for ``--accept-non-chest``."""
    return "flag" if accept_non_chest else "refuse"


def verdict_marks(ood: dict[str, Any] | None, warnings: list[str], prediction_set: list[str] | None = None,
                  refer: bool = False) -> str:
    """What follows a prediction on its line: the conformal prediction set (when the model has one), the
    out-of-distribution mark, REFER when the case should go to a radiologist, and the reader's warnings."""
    shown = f"  set {{{printable(', '.join(prediction_set))}}}" if prediction_set is not None else ""
    flag = "  [bold red]OUT OF DISTRIBUTION[/bold red]" if ood and ood["flagged"] else ""
    referral = "  [bold red]REFER[/bold red]" if refer else ""
    notes = f"  [yellow]warning: {printable('; '.join(warnings))}[/yellow]" if warnings else ""
    return shown + flag + referral + notes


def prediction_marks(p: Any) -> str:
    """``verdict_marks`` of a ``Prediction`` (or any record with ood, warnings, prediction_set and refer)."""
    return verdict_marks(p.ood, p.warnings, getattr(p, "prediction_set", None), bool(getattr(p, "refer", False)))


def outside_paths(allow: bool) -> dict[str, bool]:
    """``load_dataset``'s ``allow_outside_paths`` keyword, given only when asked for: its default (refuse)
    stays load_dataset's own, and a call without the flag works with a load_dataset of either vintage."""
    return {"allow_outside_paths": True} if allow else {}


def not_a_file(path: Path, option: str = "--out") -> None:
    """Fail with one line when ``path``, meant as a folder, exists as something else."""
    if path.exists() and not path.is_dir():
        fail(f"{option} {path} exists and is not a folder")


def output_folder(path: Path, option: str = "--out") -> Path:
    """Create ``path`` (an output folder) up front, or fail with one line: a run must not compute for
    minutes and then die on an ``--out`` that is a file or cannot be written."""
    not_a_file(path, option)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        fail(f"{option} {path}: cannot create the folder ({exc.strerror or exc})")
    if not os.access(path, os.W_OK | os.X_OK):
        fail(f"{option} {path}: the folder is not writable")
    return path


def log(message: str) -> None:
    """The library's log callback: skipped files stand out as warnings, the rest is plain progress text."""
    if message.startswith("skipped "):
        warn(message)
    else:
        console.print(printable(message), highlight=False, soft_wrap=True)


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
