"""``cxrnn train``: dataset -> fitter (frozen backbone on cached features, or fine-tuning) -> shared tail."""

from __future__ import annotations

from pathlib import Path

from cxrnn.data.dataset import load_dataset
from cxrnn.training.config import TrainConfig
from cxrnn.training.finetune import fit_finetune
from cxrnn.training.frozen import fit_frozen
from cxrnn.training.run import Log, Progress, TrainResult, finish_run
from cxrnn.utils.atomic import atomic_write_text


def train(cfg: TrainConfig, progress: Progress | None = None, log: Log | None = None) -> TrainResult:
    """Run ``cfg`` end to end and write its run directory; returns what was written and measured."""
    cfg.validate()
    log = log or (lambda msg: None)
    run_dir = Path(cfg.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", cfg.to_yaml())
    dataset = load_dataset(cfg.data)
    log(f"{len(dataset)} images, classes {', '.join(dataset.classes)}")
    fit = fit_finetune if cfg.finetune else fit_frozen
    fitted = fit(cfg, dataset, progress=progress, log=log)
    if fitted is None:  # under torchrun the other processes helped extract or train; rank 0 writes the run
        return TrainResult(run_dir, run_dir / "model.pt", {}, [])
    prepared, model = fitted
    return finish_run(cfg, run_dir, prepared, model, log)
