"""``cxrnn extract``: fill the feature store ahead of training (resumable; runs under torchrun)."""

from __future__ import annotations

from typing import Optional

import typer

from cxrnn.cli.common import app, fail, log, out_console, progress_bars


@app.command()
def extract(
    data: str = typer.Option(..., help="Dataset folder (ROOT/<class>/...) or CSV manifest."),
    backbone: str = typer.Option("efficientnet_lite0", help="Registered backbone or timm name."),
    weights: str = typer.Option("imagenet", help="imagenet, none or a local state-dict file."),
    cache_dir: Optional[str] = typer.Option(None, help="Feature store folder (default ~/.cache/cxrnn/features)."),
    feature_dtype: str = typer.Option("float32", help="float32 or float16 (half the disk and I/O)."),
    precision: str = typer.Option("fp32", help="fp32 or bf16 (autocast); bf16 maps are stored apart from fp32 ones."),
    device: str = typer.Option("cpu", help="cpu or cuda; under torchrun each process uses its local GPU."),
    runtime: str = typer.Option("auto", help="auto (onnxruntime for fp32 on the CPU, else torch), torch or onnx."),
    batch_size: int = typer.Option(16),
    workers: int = typer.Option(0, help="DataLoader processes decoding images."),
    image_cache: Optional[str] = typer.Option(None, help="Folder caching decoded images at the input size."),
    seed: int = typer.Option(0, help="Seed of --weights none."),
    strict: bool = typer.Option(False, "--strict", help="Stop at the first unreadable file."),
) -> None:
    """Extract frozen-backbone feature maps into the store; an interrupted run resumes where it stopped.

    Under ``torchrun --nproc-per-node N`` each process extracts its share of the missing maps.
    """
    from cxrnn.utils import distributed
    from cxrnn.data.dataset import load_dataset
    from cxrnn.features.store import FeatureStore
    from cxrnn.models.backbones import create_backbone

    try:
        dataset = load_dataset(data)
        store = FeatureStore(create_backbone(backbone, weights, seed=seed), cache_dir, dtype=feature_dtype,
                             precision=precision, device=device, workers=workers, image_cache=image_cache,
                             runtime=runtime)
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
