"""PACS commands: ``cxrnn pacs predict`` (studies found once) and ``cxrnn pacs watch`` (new studies as they come).

Both read frontal chest radiographs over DICOMweb, predict and explain them, and store a Structured Report
and a Secondary Capture of the Grad-CAM panel back into each image's study (see ``cxrnn.pacs.watch``).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Optional

import typer

from cxrnn.cli.common import app, console, fail, out_console, printable

pacs_app = typer.Typer(no_args_is_help=True, help="Read studies from a PACS (DICOMweb), store SR + SC results back.")
app.add_typer(pacs_app, name="pacs")

URL_HELP = "DICOMweb root of the PACS, e.g. http://pacs:8042/dicom-web (Orthanc)."
MODALITY_HELP = "Modalities to read, comma-separated; other images are skipped with the reason."


def _client(url: str, username: Optional[str], password_env: Optional[str], token_env: Optional[str],
            timeout: float, retries: int):
    from cxrnn.pacs.client import PacsClient

    try:
        return PacsClient(url, username=username, password_env=password_env, token_env=token_env,
                          timeout=timeout, retries=retries)
    except ValueError as exc:
        fail(str(exc))


def _line(text: str) -> None:
    out_console.print(printable(text), highlight=False, soft_wrap=True)


def _runner(client, model: Path, modality: str):
    from cxrnn.pacs.watch import PacsRunner

    modalities = [m for m in modality.split(",") if m.strip()]
    if not modalities:
        fail("--modality names no modality")
    try:
        return PacsRunner(client, model, modalities, log=_line)
    except (ValueError, FileNotFoundError) as exc:
        fail(str(exc))


def _report(summary) -> None:
    for entry in summary.skipped:
        console.print(f"skipped {printable(entry)}", highlight=False, soft_wrap=True)
    for entry in summary.failed:
        console.print(f"[red]failed[/red] {printable(entry)}", highlight=False, soft_wrap=True)
    _line(summary.line())


USERNAME = typer.Option(None, help="HTTP basic user name.")
PASSWORD_ENV = typer.Option(None, "--password-env", help="Environment variable holding the HTTP basic password.")
TOKEN_ENV = typer.Option(None, "--token-env", help="Environment variable holding a bearer token.")
TIMEOUT = typer.Option(30.0, help="Seconds to wait for each answer of the PACS.")
RETRIES = typer.Option(3, help="Retries of a refused connection or a 502/503/504 answer.")


@pacs_app.command("predict")
def pacs_predict(
    model: Path = typer.Argument(..., help="model.pt of a run."),
    url: str = typer.Option(..., help=URL_HELP),
    study: Optional[str] = typer.Option(None, help="One study (StudyInstanceUID)."),
    since: Optional[str] = typer.Option(None, help="Studies from this date on (YYYYMMDD)."),
    modality: str = typer.Option("CR,DX", help=MODALITY_HELP),
    username: Optional[str] = USERNAME,
    password_env: Optional[str] = PASSWORD_ENV,
    token_env: Optional[str] = TOKEN_ENV,
    timeout: float = TIMEOUT,
    retries: int = RETRIES,
) -> None:
    """Predict the frontal chest radiographs of PACS studies; store an SR and an SC per image in its study.

    A study that already holds an SR of this model (series "cxrnn SR <model id>") is skipped.
    """
    from cxrnn.pacs.client import PacsError

    if study and since:
        fail("give --study or --since, not both")
    client = _client(url, username, password_env, token_env, timeout, retries)
    with _runner(client, model, modality) as runner:
        try:
            summary = runner.run(study=study, since=since)
        except PacsError as exc:
            fail(str(exc), code=1)
        except ValueError as exc:
            fail(str(exc))
    _report(summary)
    if summary.failed:
        raise typer.Exit(1)


@pacs_app.command("watch")
def pacs_watch(
    model: Path = typer.Argument(..., help="model.pt of a run."),
    url: str = typer.Option(..., help=URL_HELP),
    interval: float = typer.Option(30.0, help="Seconds between polls."),
    since: Optional[str] = typer.Option(None, help="Only studies from this date on (YYYYMMDD)."),
    modality: str = typer.Option("CR,DX", help=MODALITY_HELP),
    state: Optional[Path] = typer.Option(None, help="State file of the studies done (default: pacs_watch.json next to the model)."),
    max_polls: Optional[int] = typer.Option(None, "--max-polls", help="Stop after this many polls (default: run until Ctrl-C)."),
    username: Optional[str] = USERNAME,
    password_env: Optional[str] = PASSWORD_ENV,
    token_env: Optional[str] = TOKEN_ENV,
    timeout: float = TIMEOUT,
    retries: int = RETRIES,
) -> None:
    """Poll the PACS and process each new study once (a restart resumes from the state file); Ctrl-C stops."""
    from cxrnn.pacs.watch import WatchState, stop_on_signals, watch

    if interval <= 0:
        fail(f"--interval must be > 0 seconds, not {interval}")
    if max_polls is not None and max_polls < 1:
        fail(f"--max-polls must be >= 1, not {max_polls}")
    client = _client(url, username, password_env, token_env, timeout, retries)
    with _runner(client, model, modality) as runner:
        try:
            done = WatchState(state or model.parent / "pacs_watch.json", runner.model["id"])
        except ValueError as exc:
            fail(str(exc))
        stop = threading.Event()
        restore = stop_on_signals(stop)
        _line(f"watching {client.shown_url} every {interval:g} s ({len(done.done)} stud(ies) done before); Ctrl-C stops")
        try:
            summary = watch(runner, done, interval=interval, since=since, max_polls=max_polls, stop=stop)
        finally:
            restore()
    _report(summary)
    _line("stopped" if stop.is_set() else f"done after {max_polls} poll(s)")
