"""Data and registry commands: ``cxrnn phantom`` (the synthetic dataset) and ``cxrnn backbones``."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from cxrnn.cli.common import app, in_range, out_console, progress_bars
from cxrnn.data.phantom import PhantomConfig, generate_phantom
from cxrnn.training.config import above, at_least, within

PHANTOM = PhantomConfig()  # the options' defaults are the library's
MIN_SIZE = 64


@app.command()
def phantom(
    out_dir: Path = typer.Argument(..., help="Folder to write the phantom dataset to."),
    per_class: int = typer.Option(PHANTOM.per_class, help="Images per class.", callback=in_range(at_least(1))),
    # the anatomy and the hospital markers need room; past 4096 px a phantom is only a memory test
    size: int = typer.Option(PHANTOM.size, help="Image side in pixels.", callback=in_range(within(MIN_SIZE, 4096))),
    seed: int = typer.Option(PHANTOM.seed, help="Random seed (same seed, same files).", callback=in_range(at_least(0))),
    difficulty: float = typer.Option(PHANTOM.difficulty, help="Lesion subtlety: >1 harder, <1 easier.",
                                     callback=in_range(above(0))),
    sources: int = typer.Option(PHANTOM.sources, help="Number of simulated hospitals, each with its own style.",
                                callback=in_range(at_least(1))),
    shortcut: bool = typer.Option(PHANTOM.shortcut, help="Burn in a marker whose presence correlates with the class."),
) -> None:
    """Generate the synthetic chest X-ray phantom (covid / normal / pneumonia) with lesion masks."""
    cfg = PhantomConfig(per_class=per_class, size=size, seed=seed, difficulty=difficulty, sources=sources,
                        shortcut=shortcut)
    with progress_bars() as bars:
        manifest = generate_phantom(out_dir, cfg, progress=lambda d, t: bars("phantom", d, t))
    out_console.print(f"wrote {3 * per_class} images and {manifest}")


@app.command()
def backbones() -> None:
    """List the registered backbones with their input size, feature sequence and Grad-CAM layer."""
    from cxrnn.models.backbones import get_spec, list_backbones

    table = Table(title="backbones (any timm model name also works)")
    for col in ("name", "timm", "input", "sequence", "target layer", "notes"):
        table.add_column(col)
    for name in list_backbones():
        spec = get_spec(name)
        h, w = spec.feature_hw()
        table.add_row(name, spec.timm_name, str(spec.preprocessing.input_size),
                      f"{h * w} x {spec.feature_channels}", spec.target_layer, spec.description)
    out_console.print(table)
