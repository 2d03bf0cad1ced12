"""Core commands: phantom, train, evaluate, predict, backbones, demo. They parse and call the API."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from cxrnn.cli.common import app, console, fail, log, out_console, print_metrics, progress_bars, warn


@app.command()
def phantom(
    out_dir: Path = typer.Argument(..., help="Folder to write the phantom dataset to."),
    per_class: int = typer.Option(300, help="Images per class."),
    size: int = typer.Option(256, help="Image side in pixels."),
    seed: int = typer.Option(0, help="Random seed (same seed, same files)."),
    difficulty: float = typer.Option(1.0, help="Lesion subtlety: >1 harder, <1 easier."),
    sources: int = typer.Option(1, help="Number of simulated hospitals, each with its own style."),
    shortcut: bool = typer.Option(False, help="Burn in a marker whose presence correlates with the class."),
) -> None:
    """Generate the synthetic chest X-ray phantom (covid / normal / pneumonia) with lesion masks."""
    from cxrnn.data.phantom import PhantomConfig, generate_phantom

    cfg = PhantomConfig(per_class=per_class, size=size, seed=seed, difficulty=difficulty, sources=sources,
                        shortcut=shortcut)
    with progress_bars() as bars:
        manifest = generate_phantom(out_dir, cfg, progress=lambda d, t: bars("phantom", d, t))
    out_console.print(f"wrote {3 * per_class} images and {manifest}")


@app.command()
def train(
    data: Optional[str] = typer.Option(None, help="Dataset folder (ROOT/<class>/...) or CSV manifest."),
    backbone: Optional[str] = typer.Option(None, help="vgg19, densenet121, inception_v3, inception_resnet_v2, efficientnet_lite0 or a timm name."),
    head: Optional[str] = typer.Option(None, help="bilstm (default), lstm, gru, pool or paper."),
    weights: Optional[str] = typer.Option(None, help="imagenet, none or a local state-dict file."),
    out: Optional[str] = typer.Option(None, help="Run directory."),
    config: Optional[Path] = typer.Option(None, help="YAML file with any of these options."),
    preset: Optional[str] = typer.Option(None, help="'paper': RMSprop, lr 2e-4*0.95^epoch, batch 16, 20 epochs, paper head."),
    seed: Optional[int] = typer.Option(None),
    test_size: Optional[float] = typer.Option(None, help="Share held out for testing (default 0.2)."),
    val_size: Optional[float] = typer.Option(None, help="Share of the rest used for validation (default 0.1)."),
    folds: Optional[int] = typer.Option(None, help="k-fold cross-validation on the non-test part."),
    group_by: Optional[str] = typer.Option(None, help="Manifest column whose groups never straddle a split."),
    optimizer: Optional[str] = typer.Option(None, help="adamw, adam, rmsprop or sgd."),
    lr: Optional[float] = typer.Option(None),
    lr_schedule: Optional[str] = typer.Option(None, help="constant, exponential or cosine."),
    epochs: Optional[int] = typer.Option(None),
    batch_size: Optional[int] = typer.Option(None),
    patience: Optional[int] = typer.Option(None, help="Early-stopping patience in epochs (0: off)."),
    finetune: Optional[bool] = typer.Option(None, "--finetune/--frozen", help="Train end to end (with augmentation)."),
    backbone_lr_scale: Optional[float] = typer.Option(None, help="With --finetune: the backbone's learning rate as a share of the head's (default 0.1)."),
    freeze_rnn: Optional[bool] = typer.Option(None, "--freeze-rnn", help="Keep the paper head's LSTM at random init, as the seed did."),
    cache_dir: Optional[str] = typer.Option(None, help="Feature cache folder (default ~/.cache/cxrnn/features)."),
    strict: Optional[bool] = typer.Option(None, "--strict", help="Stop at the first unreadable file."),
    bootstrap: Optional[int] = typer.Option(None, help="Bootstrap resamples for 95% intervals (default 1000, 0: none)."),
    dedup: Optional[bool] = typer.Option(None, "--dedup/--no-dedup", help="Keep exact/near-duplicate images on one side of every split (default on)."),
    near_duplicate_threshold: Optional[int] = typer.Option(None, help="pHash bits (of 256) for near-duplicates (default 12)."),
    align_threshold: Optional[float] = typer.Option(None, help="Band-pass NCC after alignment for shifted, cropped or rotated copies (default 0.9, 0: off)."),
    leave_one_source_out: Optional[bool] = typer.Option(None, "--leave-one-source-out", help="Also evaluate each source held out in turn."),
    device: Optional[str] = typer.Option(None, help="cpu (default) or cuda; under torchrun each process uses its local GPU."),
    precision: Optional[str] = typer.Option(None, help="fp32 (default) or bf16 autocast for extraction and training."),
    extract_runtime: Optional[str] = typer.Option(None, help="auto (default: onnxruntime for fp32 on the CPU), torch or onnx: what runs the frozen backbone."),
    workers: Optional[int] = typer.Option(None, help="DataLoader processes decoding images (default 0: in process)."),
    image_cache: Optional[str] = typer.Option(None, help="Folder caching decoded images at the input size."),
    feature_dtype: Optional[str] = typer.Option(None, help="float32 (default) or float16 feature store."),
) -> None:
    """Train a CNN->RNN model; writes config.yaml, model.pt, history.csv, metrics.json, plots, report.md."""
    from cxrnn.training.config import resolve_config
    from cxrnn.training.run import train as run_train

    values = dict(data=data, backbone=backbone, head=head, weights=weights, out=out, seed=seed,
                  test_size=test_size, val_size=val_size, folds=folds, group_by=group_by, optimizer=optimizer,
                  lr=lr, lr_schedule=lr_schedule, epochs=epochs, batch_size=batch_size, patience=patience,
                  finetune=finetune, backbone_lr_scale=backbone_lr_scale, freeze_rnn=freeze_rnn,
                  cache_dir=cache_dir, strict=strict, bootstrap=bootstrap, dedup=dedup,
                  near_duplicate_threshold=near_duplicate_threshold, align_threshold=align_threshold,
                  leave_one_source_out=leave_one_source_out, device=device, precision=precision, workers=workers,
                  extract_runtime=extract_runtime,
                  image_cache=image_cache, feature_dtype=feature_dtype)
    try:
        cfg = resolve_config(values, config, preset)
        if not cfg.data:
            fail("--data is required (here or in --config)")
        with progress_bars() as bars:
            result = run_train(cfg, progress=bars, log=log)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        fail(str(exc))
    from cxrnn.utils import distributed

    if not distributed.info().is_main:
        return  # under torchrun, rank 0 reports
    print_metrics(result.metrics, title=f"test split: {cfg.backbone} + {cfg.head}")
    out_console.print(f"run directory: {result.run_dir}  (model: {result.model_path})")


@app.command()
def evaluate(
    model: Path = typer.Argument(..., help="model.pt of a run."),
    data: str = typer.Option(..., help="Dataset folder or CSV manifest with the model's classes."),
    out: Optional[Path] = typer.Option(None, help="Output folder (default: eval/ next to the model)."),
) -> None:
    """Score a model on a labelled dataset: metrics.json, confusion_matrix.png, roc.png."""
    from cxrnn.data.dataset import load_dataset
    from cxrnn.evaluation.scoring import evaluate_dataset, write_evaluation
    from cxrnn.models.bundle import load_bundle

    try:
        bundle = load_bundle(model)
        dataset = load_dataset(data, classes=bundle.classes)
        with progress_bars() as bars:
            result = evaluate_dataset(bundle, dataset, progress=lambda d, t: bars("evaluate", d, t))
    except (ValueError, FileNotFoundError) as exc:
        fail(str(exc))
    for err in result.errors:
        warn(f"skipped {err}")
    out_dir = out or model.parent / "eval"
    from cxrnn.evaluation.honest import add_uncertainty

    out_dir.mkdir(parents=True, exist_ok=True)
    add_uncertainty(result.metrics, result.y_true, result.probs, bundle.classes, out_dir, n_boot=1000)
    write_evaluation(out_dir, result.y_true, result.probs, bundle.classes, result.paths, result.metrics)
    print_metrics(result.metrics, title=f"evaluation on {data}")
    out_console.print(f"wrote {out_dir / 'metrics.json'}")


@app.command()
def predict(
    model: Path = typer.Argument(..., help="model.pt of a run."),
    paths: List[Path] = typer.Argument(..., help="Image files or folders."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per image on stdout."),
    batch_size: int = typer.Option(16),
    strict: bool = typer.Option(False, "--strict", help="Exit with an error at the first unreadable file."),
    runtime: str = typer.Option("torch", help="torch or onnx (onnxruntime; the model is exported on the fly)."),
    device: str = typer.Option("cpu", help="cpu or cuda (torch runtime)."),
    precision: str = typer.Option("fp32", help="fp32 or bf16 (autocast; torch runtime)."),
    cam: Optional[Path] = typer.Option(None, "--cam", help="Also write Grad-CAM maps (overlay, panel, .npy) to this folder."),
) -> None:
    """Classify images: the label and every class probability per image."""
    from cxrnn.data.dataset import list_image_files
    from cxrnn.inference.predictor import Predictor

    try:
        predictor = Predictor.from_file(model, batch_size=batch_size, runtime=runtime, device=device,
                                        precision=precision)
        files = list_image_files(paths)
    except (ValueError, FileNotFoundError) as exc:
        fail(str(exc))
    if not files:
        fail("no image files found in " + ", ".join(map(str, paths)))
    failures = 0
    for start in range(0, len(files), batch_size):
        for p in predictor.predict_paths(files[start : start + batch_size]):
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
                flag = ("  [bold red]OUT OF DISTRIBUTION[/bold red]" if p.ood["flagged"] else "") if p.ood else ""
                out_console.print(f"{p.path}: [bold]{p.label}[/bold]  ({probs}){flag}", highlight=False)
    if failures:
        console.print(f"{failures} of {len(files)} file(s) could not be read", highlight=False)
    if cam is not None:
        from cxrnn.cli.explain import write_cam_dir

        write_cam_dir(predictor.bundle, files, cam, batch_size=min(batch_size, 8), quiet=True)


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
