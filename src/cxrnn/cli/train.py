"""Training commands: ``cxrnn extract`` (fill the feature store), ``cxrnn train`` and ``cxrnn compare``.

The training options are TrainConfig's fields (``cxrnn.cli.options``); ``extract`` takes its defaults from
the same fields, so the store it fills is the one ``train`` reads with the same options.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table

from cxrnn.cli.common import app, fail, fmt, log, not_a_file, out_console, outside_paths, print_metrics, progress_bars
from cxrnn.cli.options import config_default, config_help, config_range, with_config_options
from cxrnn.training.config import TrainConfig, resolve_config

CONFIG_HELP = "YAML file with any of these options (a run's config.yaml works)."


def resolved(options: dict[str, Any], config: Path | None) -> TrainConfig:
    """The run's TrainConfig (defaults < preset < config file < command line), or an error line and exit 2."""
    try:
        cfg = resolve_config(options, config)
    except (ValueError, FileNotFoundError) as exc:
        fail(str(exc))
    if not cfg.data:
        fail("--data is required (here or in --config)")
    return cfg


@app.command()
def extract(
    data: str = typer.Option(..., help=config_help("data")),
    backbone: str = typer.Option(config_default("backbone"), help="Registered backbone or timm name."),
    weights: str = typer.Option(config_default("weights"), help=config_help("weights")),
    cache_dir: Optional[str] = typer.Option(None, help=config_help("cache_dir")),
    feature_dtype: str = typer.Option(config_default("feature_dtype"), help=config_help("feature_dtype")),
    precision: str = typer.Option(config_default("precision"),
                                  help="fp32 or bf16 (autocast); bf16 maps are stored apart from fp32 ones."),
    device: str = typer.Option(config_default("device"), help=config_help("device")),
    runtime: str = typer.Option(config_default("extract_runtime"),
                                help="auto (onnxruntime for fp32 on the CPU, else torch), torch or onnx."),
    batch_size: int = typer.Option(config_default("extract_batch_size"), callback=config_range("extract_batch_size")),
    workers: int = typer.Option(config_default("workers"), help="DataLoader processes decoding images.",
                                callback=config_range("workers")),
    image_cache: Optional[str] = typer.Option(None, help="Folder caching decoded images at the input size."),
    seed: int = typer.Option(config_default("seed"), help="Seed of --weights none.", callback=config_range("seed")),
    input_size: int = typer.Option(config_default("input_size"), help=config_help("input_size"),
                                   callback=config_range("input_size")),
    strict: bool = typer.Option(config_default("strict"), "--strict", help=config_help("strict")),
    allow_outside_paths: bool = typer.Option(config_default("allow_outside_paths"), "--allow-outside-paths",
                                             help=config_help("allow_outside_paths")),
) -> None:
    """Extract frozen-backbone feature maps into the store; an interrupted run resumes where it stopped.

    Under ``torchrun --nproc-per-node N`` each process extracts its share of the missing maps.
    """
    from cxrnn.data.dataset import load_dataset
    from cxrnn.features.store import FeatureStore
    from cxrnn.models.backbones import create_backbone
    from cxrnn.utils import distributed

    try:
        dataset = load_dataset(data, **outside_paths(allow_outside_paths))
        store = FeatureStore(create_backbone(backbone, weights, seed=seed, input_size=input_size), cache_dir,
                             dtype=feature_dtype, precision=precision, device=device, workers=workers,
                             image_cache=image_cache, runtime=runtime)
        with progress_bars() as bars:
            result = store.extract([s.path for s in dataset.samples], batch_size=batch_size, strict=strict,
                                   progress=(lambda d, t: bars("extract", d, t)), warn=log)
        main = distributed.info().is_main
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        fail(str(exc))
    finally:
        distributed.cleanup()
    if main:
        out_console.print(f"{len(result.kept)} feature maps {tuple(result.features.shape[1:])} in {store.directory} "
                          f"({result.n_computed} computed, {result.n_cached} already stored, "
                          f"{len(result.errors)} unreadable; engine {store.engine_name or 'none needed'})")


@app.command()
@with_config_options()
def train(config: Optional[Path] = typer.Option(None, help=CONFIG_HELP), **options: Any) -> None:
    """Train a CNN->RNN model; writes config.yaml, model.pt, history.csv, metrics.json, plots, report.md."""
    from cxrnn.training import train as run_train
    from cxrnn.utils import distributed

    cfg = resolved(options, config)
    not_a_file(Path(cfg.out))  # before the minutes of extraction and training, not after
    try:
        with progress_bars() as bars:
            result = run_train(cfg, progress=bars, log=log)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        fail(str(exc))
    if not distributed.info().is_main:
        return  # under torchrun, rank 0 reports
    print_metrics(result.metrics, title=f"test split: {cfg.backbone} + {cfg.head}")
    out_console.print(f"run directory: {result.run_dir}  (model: {result.model_path})")


@app.command()
@with_config_options(["data", "weights", "epochs", "seed", "bootstrap", "cache_dir", "preset", "allow_outside_paths"])
def compare(
    backbones: str = typer.Option("vgg19,densenet121,inception_v3,inception_resnet_v2", help="Comma-separated backbones."),
    heads: str = typer.Option("lstm,pool", help="Comma-separated heads."),
    out: Path = typer.Option(Path("runs/compare"), help="Output folder."),
    config: Optional[Path] = typer.Option(None, help="YAML with training options shared by every pair."),
    **options: Any,
) -> None:
    """Train every backbone x head pair on the same split; write compare.md, compare.csv and compare.png."""
    from cxrnn.training.compare import compare as run_compare

    cfg = resolved(options, config)
    not_a_file(out)
    try:
        with progress_bars() as bars:
            rows = run_compare(cfg, [b.strip() for b in backbones.split(",") if b.strip()],
                               [h.strip() for h in heads.split(",") if h.strip()], out, progress=bars, log=log)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        fail(str(exc))
    table = Table(title="comparison (test split)")
    for col in ("backbone", "head", "accuracy", "F1", "AUC", "ECE", "ms/image"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["backbone"], r["head"], fmt(r["accuracy"]), fmt(r["macro_f1"]), fmt(r["macro_auc"]), fmt(r["ece"]),
                      f"{r['inference_ms_per_image']:.1f}")
    out_console.print(table)
    out_console.print(f"wrote {out / 'compare.md'}, {out / 'compare.csv'} and {out / 'compare.png'}")
