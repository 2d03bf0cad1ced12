"""Explanation commands: ``cxrnn explain`` (maps on the X-rays) and ``cxrnn explain-eval`` (maps against lesion masks)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional

import typer

from cxrnn.cli.common import (ACCEPT_NON_CHEST_HELP, acquisition_policy, app, console, fail, in_range, out_console,
                              output_folder, outside_paths, printable, progress_bars, verdict_marks, warn)
from cxrnn.cli.options import config_help
from cxrnn.explain.registry import CURVE_STEPS, DEFAULT_EVAL_METHODS, DEFAULT_METHOD
from cxrnn.training.config import at_least, within

METHOD_HELP = ("ig-sequence (default: integrated gradients on the feature-map sequence blurred by half a cell, "
               "one backbone pass), occlusion (each feature-map step replaced by the training mean, one backbone pass), "
               "gradcam, gradcam++, xgradcam, eigencam (class-agnostic), scorecam (slow: one pass per channel), "
               "ig-pixels (integrated gradients on the pixels, slow) or pixel-occlusion (slow reference: one pass "
               "per patch).")
LAYER_HELP = "Backbone module for the map (dotted path in the timm model); default: the registry's layer."
BATCH_SIZE = in_range(at_least(1))


def maps_summary(index: dict[str, Any], out_dir: Path) -> str:
    """The closing line of ``explain`` and ``predict --cam``: what was written where."""
    return (f"maps of {index['n']} image(s) ({index['method']}, layer {index['layer']}) in {out_dir}"
            + (f"; {index['errors']} file(s) could not be read" if index["errors"] else ""))


@app.command()
def explain(
    model: Path = typer.Argument(..., help="model.pt of a run."),
    paths: List[Path] = typer.Argument(..., help="Image files or folders (PNG, JPEG, TIFF, DICOM...)."),
    out: Path = typer.Option(..., "--out", help="Folder for NAME_cam.png, NAME_panel.png, NAME_cam.npy."),
    method: str = typer.Option(DEFAULT_METHOD, help=METHOD_HELP),
    target: Optional[str] = typer.Option(None, help="Class to explain (default: the predicted class)."),
    layer: Optional[str] = typer.Option(None, help=LAYER_HELP),
    batch_size: int = typer.Option(8, callback=BATCH_SIZE),
    alpha: float = typer.Option(0.4, help="Opacity of the colour map over the X-ray.", callback=in_range(within(0, 1))),
    colormap: str = typer.Option("jet", help="Any matplotlib colour map name."),
    accept_non_chest: bool = typer.Option(False, "--accept-non-chest", help=ACCEPT_NON_CHEST_HELP),
) -> None:
    """Maps through the whole CNN->RNN (integrated gradients on the feature-map sequence by default, or
    Grad-CAM and the others of --method), drawn on each X-ray at its own aspect."""
    from cxrnn.data.dataset import list_image_files
    from cxrnn.explain.cam import Explanation
    from cxrnn.explain.folder import explain_to_dir
    from cxrnn.models.bundle import load_bundle

    output_folder(out)
    files = list_image_files(paths)
    if not files:
        fail("no image files found in " + ", ".join(map(str, paths)))

    def report(exp: Explanation, written: dict[str, str]) -> None:
        if exp.error is not None:
            warn(f"skipped {exp.error}")
        else:
            probs = "  ".join(f"{c} {v:.3f}" for c, v in exp.probabilities.items())
            out_console.print(f"{printable(exp.path)}: [bold]{exp.label}[/bold]  ({probs})"
                              f"{verdict_marks(exp.ood, exp.warnings)}  map of "
                              f"'{printable(exp.target)}' -> {printable(Path(written['panel']).name)}",
                              highlight=False, soft_wrap=True)

    try:
        bundle = load_bundle(model)
        with progress_bars() as bars:
            index = explain_to_dir(bundle, files, out, method=method, target=target, layer=layer,
                                   batch_size=batch_size, alpha=alpha, colormap=colormap,
                                   progress=lambda d, t: bars("explain", d, t), on_result=report,
                                   acquisition=acquisition_policy(accept_non_chest))
    except (ValueError, OSError) as exc:  # OSError: the folder checked above can still fill up or vanish
        fail(str(exc))
    console.print(printable(maps_summary(index, out)), highlight=False, soft_wrap=True)


@app.command("explain-eval")
def explain_eval(
    model: Path = typer.Argument(..., help="model.pt of a run."),
    data: Path = typer.Option(..., help="Phantom folder (or manifest CSV) with lesion 'mask' and 'lung_mask' columns."),
    out: Optional[Path] = typer.Option(None, help="JSON file for the results (default: explain_eval.json next to the "
                                                  "model); the table goes beside it as explain_eval.md."),
    methods: Optional[str] = typer.Option(None, "--methods", "--method",
                                          help="Comma-separated methods to compare on the same images, or 'all' "
                                               f"(default: {','.join(DEFAULT_EVAL_METHODS)}). " + METHOD_HELP),
    layer: Optional[str] = typer.Option(None, help=LAYER_HELP),
    target: str = typer.Option("true", help="'true': explain each image's true class; 'predicted': the model's choice."),
    batch_size: int = typer.Option(8, callback=BATCH_SIZE),
    curve_steps: int = typer.Option(CURVE_STEPS, help="Steps of the deletion / insertion curves (0: skip them; each "
                                                      "step is a whole-network pass per image and method).",
                                    callback=in_range(at_least(0))),
    allow_outside_paths: bool = typer.Option(False, "--allow-outside-paths", help=config_help("allow_outside_paths")),
) -> None:
    """Check maps against known lesions and against the model: pointing game (5% and zero tolerance, with 95%
    intervals), energy in lesions, deletion / insertion AUC against random pixel and cell orders, seconds per image."""
    from cxrnn.data.dataset import load_dataset
    from cxrnn.explain.localisation import comparison_table, evaluate_explanations, write_explain_eval
    from cxrnn.models.bundle import load_bundle

    if out is not None and out.is_dir():
        fail(f"--out {out} is a folder; it names the JSON file to write")
    try:
        bundle = load_bundle(model)
        # loaded here rather than by evaluate_explanations, which has no say over outside paths
        dataset = load_dataset(data, classes=bundle.classes, **outside_paths(allow_outside_paths))
        with progress_bars() as bars:
            result = evaluate_explanations(bundle, dataset, methods=methods, layer=layer, target=target,
                                           batch_size=batch_size, curve_steps=curve_steps,
                                           progress=lambda d, t: bars("explain", d, t), warn=warn)
    except (ValueError, FileNotFoundError) as exc:
        fail(str(exc))
    path = write_explain_eval(result, out or model.parent / "explain_eval.json")
    # The table as markdown: it stays one line per row in a narrow terminal or a pipe, and is the .md file's.
    out_console.print(f"maps on {data}: hit = map maximum within {result['tolerance']:.0%} of the width of the lesion "
                      "(5%) or inside it (0), 95% bootstrap intervals; deletion AUC lower / insertion AUC higher = "
                      "more faithful to the model", highlight=False, soft_wrap=True)
    for line in comparison_table(result):
        out_console.print(line, highlight=False, soft_wrap=True, markup=False)
    removed = result.get("lesion_removed")
    if removed:
        out_console.print(
            f"lesion removed: {removed['abnormal_rate_with_lesion']:.3f} of {removed['n_cases']} abnormal cases called "
            f"abnormal with their lesion, {removed['still_abnormal_rate']:.3f} without it (a model that uses the "
            "lesion drops to near 0; then a low hit rate is the map's failure, not a shortcut)", highlight=False)
    out_console.print(f"wrote {path} and {path.with_suffix('.md').name}")
    if result["errors"]:
        console.print(f"{len(result['errors'])} file(s) could not be read", highlight=False)
