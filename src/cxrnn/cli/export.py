"""``cxrnn export``: the inference graph as ONNX or TorchScript."""

from __future__ import annotations

from pathlib import Path

import typer

from cxrnn.cli.common import app, fail, out_console


@app.command()
def export(
    model: Path = typer.Argument(..., help="model.pt of a run."),
    format: str = typer.Option("onnx", "--format", help="onnx or torchscript."),
    out: Path = typer.Option(..., help="Output file (e.g. model.onnx)."),
) -> None:
    """Export the inference graph (probabilities, logits, OOD score) with a free batch axis."""
    from cxrnn.inference.export import export_model

    try:
        path = export_model(model, format, out)
    except (ValueError, FileNotFoundError) as exc:
        fail(str(exc))
    out_console.print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
