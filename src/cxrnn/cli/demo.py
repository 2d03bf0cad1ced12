"""``cxrnn demo``: phantom -> training -> test metrics -> a prediction on a real radiograph, offline."""

from __future__ import annotations

from pathlib import Path

import typer

from cxrnn.cli.common import app, log, out_console, print_metrics, progress_bars


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
    rg1 = result.reference_prediction
    out_console.print(f"real radiograph {Path(rg1.path).name}: "
                      + (f"[bold]{rg1.label}[/bold] " + "  ".join(f"{c} {v:.3f}" for c, v in rg1.probabilities.items())
                         if rg1.error is None else f"error {rg1.error}"), highlight=False)
    out_console.print("(the phantom is synthetic: a prediction on a real radiograph from a phantom-trained model "
                      "shows the pipeline works end to end, not a diagnosis)")
    out_console.print(f"phantom: {result.phantom_dir}\nrun: {result.train.run_dir}  ({result.seconds:.0f} s)")
