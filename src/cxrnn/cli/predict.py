"""Scoring commands: ``cxrnn predict`` (labels for images, optionally with their maps) and ``cxrnn evaluate``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from cxrnn.cli.common import (ACCEPT_NON_CHEST_HELP, acquisition_policy, app, console, fail, in_range, out_console,
                              output_folder, outside_paths, prediction_marks, print_metrics, printable, progress_bars, warn)
from cxrnn.cli.options import config_help, config_range
from cxrnn.cli.explain import METHOD_HELP
from cxrnn.evaluation.bootstrap import DEFAULT_BOOTSTRAP
from cxrnn.explain.registry import DEFAULT_METHOD
from cxrnn.training.config import at_least

BATCH_SIZE = in_range(at_least(1))


@app.command()
def evaluate(
    model: Path = typer.Argument(..., help="model.pt of a run."),
    data: str = typer.Option(..., help="Dataset folder or CSV manifest with the model's classes."),
    out: Optional[Path] = typer.Option(None, help="Output folder (default: eval/ next to the model)."),
    bootstrap: int = typer.Option(DEFAULT_BOOTSTRAP, help="Bootstrap resamples for the 95% intervals (0: none).",
                                  callback=config_range("bootstrap")),
    allow_outside_paths: bool = typer.Option(False, "--allow-outside-paths", help=config_help("allow_outside_paths")),
) -> None:
    """Score a model on a labelled dataset: metrics.json (95% intervals, ECE), confusion, ROC and reliability plots."""
    from cxrnn.data.dataset import load_dataset
    from cxrnn.evaluation.scoring import evaluate_to_dir
    from cxrnn.models.bundle import load_bundle

    out_dir = output_folder(out or model.parent / "eval")
    try:
        bundle = load_bundle(model)
        dataset = load_dataset(data, classes=bundle.classes, **outside_paths(allow_outside_paths))
        with progress_bars() as bars:
            result = evaluate_to_dir(bundle, dataset, out_dir, n_boot=bootstrap,
                                     progress=lambda d, t: bars("evaluate", d, t))
    except (ValueError, FileNotFoundError) as exc:
        fail(str(exc))
    for err in result.errors:
        warn(f"skipped {err}")
    print_metrics(result.metrics, title=f"evaluation on {data}")
    out_console.print(f"wrote {out_dir / 'metrics.json'}")


@app.command()
def predict(
    model: Path = typer.Argument(..., help="model.pt of a run."),
    paths: List[Path] = typer.Argument(..., help="Image files or folders."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per image on stdout."),
    batch_size: int = typer.Option(16, callback=BATCH_SIZE),
    strict: bool = typer.Option(False, "--strict", help="Exit with an error at the first unreadable file."),
    runtime: str = typer.Option("torch", help="torch or onnx (onnxruntime; the model is exported on the fly)."),
    device: str = typer.Option("cpu", help="cpu or cuda (torch runtime)."),
    precision: str = typer.Option("fp32", help="fp32 or bf16 (autocast; torch runtime)."),
    cam: Optional[Path] = typer.Option(None, "--cam", help="Also write maps (overlay, panel, .npy) to this folder."),
    method: str = typer.Option(DEFAULT_METHOD, help="Map method of --cam and --dicom-out: " + METHOD_HELP),
    accept_non_chest: bool = typer.Option(False, "--accept-non-chest", help=ACCEPT_NON_CHEST_HELP),
    dicom_out: Optional[Path] = typer.Option(
        None, "--dicom-out", help="Also write, per DICOM input, a Structured Report of the finding (NAME_sr.dcm) and a "
                                  "Secondary Capture of the map panel (NAME_sc.dcm) to this folder."),
) -> None:
    """Classify images: the label and every class probability per image.

    DICOM objects that are not chest radiographs are refused with the reason (see --accept-non-chest); a
    lateral view or a DICOM without Modality is predicted with a warning.
    """
    from cxrnn.data.dataset import list_image_files
    from cxrnn.inference.predictor import NO_CONFORMAL_NOTICE, Prediction, Predictor

    try:
        predictor = Predictor.from_file(model, batch_size=batch_size, runtime=runtime, device=device,
                                        precision=precision, acquisition=acquisition_policy(accept_non_chest))
        files = list_image_files(paths)
    except (ValueError, FileNotFoundError) as exc:
        fail(str(exc))
    if not files:
        fail("no image files found in " + ", ".join(map(str, paths)))
    if predictor.conformal is None:  # once for the run, not per file
        warn(f"{model}: {NO_CONFORMAL_NOTICE}")
    if cam is not None and dicom_out is not None:
        fail("--cam and --dicom-out each run their own explanation pass: give one of them")
    if cam is not None:
        output_folder(cam, "--cam")
    if dicom_out is not None:
        output_folder(dicom_out, "--dicom-out")
    failures = 0

    def show(p: Prediction) -> None:
        nonlocal failures
        if p.error is not None:
            failures += 1
            if strict:
                fail(p.error)
        if as_json:
            print(json.dumps(p.to_dict()), flush=True)
        elif p.error is not None:
            warn(f"skipped {p.error}")
        else:
            probs = "  ".join(f"{c} {v:.3f}" for c, v in p.probabilities.items())  # type: ignore[union-attr]
            # soft_wrap: one line per file even when stdout is a pipe, which rich would wrap at 80 columns
            out_console.print(f"{printable(p.path)}: [bold]{p.label}[/bold]  ({probs}){prediction_marks(p)}",
                              highlight=False, soft_wrap=True)

    index = None
    if dicom_out is not None:
        from cxrnn.pacs.results import dicom_results_for_files, model_info

        def show_with_dicom(p: Prediction, written: dict[str, str]) -> None:
            show(p)
            if p.error is None and not written:
                warn(f"{p.path}: not a DICOM file: no SR or SC written (they must reference a DICOM source)")

        try:
            dicom_results_for_files(predictor, files, dicom_out, model_info(predictor.bundle, model),
                                    on_result=show_with_dicom, method=method)
        except (ValueError, OSError) as exc:
            fail(str(exc))
    elif cam is None:
        for start in range(0, len(files), batch_size):  # print as each batch is done, not at the end
            for p in predictor.predict_paths(files[start : start + batch_size]):
                show(p)
    else:
        from cxrnn.explain.folder import predict_and_explain_to_dir

        try:
            index = predict_and_explain_to_dir(predictor, files, cam, method=method, on_prediction=show)
        except (ValueError, FileNotFoundError) as exc:
            fail(str(exc))
    if index is not None:
        from cxrnn.cli.explain import maps_summary

        console.print(printable(maps_summary(index, cam)), highlight=False, soft_wrap=True)
    if failures == len(files):
        # nothing to show for the run: a script must be able to tell this from success
        fail(f"none of the {len(files)} file(s) could be read", code=1)
    if failures:
        console.print(f"{failures} of {len(files)} file(s) could not be read", highlight=False, soft_wrap=True)
