"""``cxrnn demo``: phantom -> training -> test metrics -> a prediction on a real radiograph, offline."""

from __future__ import annotations

from pathlib import Path

import typer

from cxrnn.cli.common import app, log, out_console, prediction_marks, print_metrics, progress_bars


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), help="Folder for the phantom (out/phantom) and the run (out/run)."),
    quick: bool = typer.Option(False, "--quick", help="A smaller phantom and fewer epochs (under a minute)."),
) -> None:
    """Phantom -> EfficientNet-Lite0 (offline ImageNet weights) + LSTM -> test metrics -> predict RG1_UNCR.dcm."""
    from cxrnn.demo import run_demo

    with progress_bars() as bars:
        result = run_demo(out, quick=quick, progress=bars, log=log)
    print_metrics(result.train.metrics, title="demo: held-out phantom test split")
    sets = result.train.metrics.get("conformal") or {}
    if "coverage" in sets:
        cov, point = sets["coverage"], sets["operating_point"]
        interval = f" [{cov['low']:.3f}, {cov['high']:.3f}]" if cov.get("low") is not None else ""
        out_console.print(f"prediction sets at {sets['target_coverage']:.0%} coverage: test coverage {cov['estimate']:.3f}"
                          f"{interval}, mean set size {sets['mean_set_size']:.2f}, referred {point['referred']:.1%}, "
                          "accuracy of the rest " + (f"{point['kept_accuracy']:.3f}" if point.get("kept_accuracy") is not None else "n/a"),
                          highlight=False)
    rg1 = result.reference_prediction
    out_console.print(f"real radiograph {Path(rg1.path).name}: "
                      + (f"[bold]{rg1.label}[/bold] " + "  ".join(f"{c} {v:.3f}" for c, v in rg1.probabilities.items())
                         + prediction_marks(rg1) if rg1.error is None else f"error {rg1.error}"), highlight=False)
    if rg1.error is None and rg1.refer:
        out_console.print(f"  refer: {rg1.refer_reason}", highlight=False)
    out_console.print("(the phantom is synthetic: a prediction on a real radiograph from a phantom-trained model "
                      "shows the pipeline works end to end, not a diagnosis)")
    out_console.print(f"phantom: {result.phantom_dir}\nrun: {result.train.run_dir}  ({result.seconds:.0f} s)")
