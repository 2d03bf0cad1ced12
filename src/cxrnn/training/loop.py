"""Fitting a head on cached feature maps (the default) with early stopping on validation loss.

With the paper head's LSTM frozen (``freeze_rnn``, the seed's protocol) its outputs are a fixed function of
the cached map too: ``fit_head`` computes them once per image into a temporary matrix and trains batch norm
and the dense layers on those, so no step runs the LSTM forward or backward. The head itself is unchanged
(prediction still runs it whole from the feature map).
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn

from cxrnn.inference.device import autocast, resolve_device
from cxrnn.features.matrix import FeatureRows, open_matrix, write_matrix
from cxrnn.models.heads import PaperHead
from cxrnn.training.config import TrainConfig
from cxrnn.training.optim import make_optimizer

EVAL_BATCH = 256

EpochCallback = Callable[[dict], None]


@dataclass
class FitResult:
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    best_val_loss: float = math.inf
    seconds: float = 0.0


def train_step(model: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor, targets: torch.Tensor, optimizer: torch.optim.Optimizer,
               loss_fn: nn.Module, device: torch.device | str, precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step on a batch; returns the detached (loss, logits), left on the device so callers can
    sum them without a host sync per step (``benchmarks/paper_protocol.py`` times this very function)."""
    with autocast(device, precision):
        logits = model(inputs)
        loss = loss_fn(logits.float(), targets)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach(), logits.detach()


def lr_at(epoch: int, cfg: TrainConfig) -> float:
    """Learning rate of a 0-based epoch; 'exponential' is the seed's lr * decay**epoch."""
    if cfg.lr_schedule == "exponential":
        return cfg.lr * cfg.lr_decay**epoch
    if cfg.lr_schedule == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * epoch / max(1, cfg.epochs)))
    return cfg.lr


def _batches(n: int, batch_size: int, generator: torch.Generator | None) -> list[torch.Tensor]:
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    return list(order.split(batch_size))


def rows_logits(model: nn.Module, rows, batch_size: int = EVAL_BATCH, device: str = "cpu",
                precision: str = "fp32") -> torch.Tensor:
    """Float32 CPU logits for feature rows (array, memmap or FeatureRows), read one batch at a time."""
    rows = rows if isinstance(rows, FeatureRows) else FeatureRows(rows)
    dev = resolve_device(device)
    model.eval()
    out = []
    with torch.inference_mode(), autocast(dev, precision):
        for batch in rows.batches(batch_size):
            out.append(model(torch.from_numpy(batch).to(dev)).float().cpu())
    return torch.cat(out) if out else torch.zeros((0, 0))


class FromRnnOutputs(nn.Module):
    """A paper head seen from its LSTM's outputs: what training runs when those outputs are cached."""

    def __init__(self, head: PaperHead):
        super().__init__()
        self.head = head

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        return self.head.from_rnn_outputs(seq)


def rnn_output_rows(head: PaperHead, rows: FeatureRows, folder: Path, name: str, device: torch.device,
                    precision: str) -> FeatureRows:
    """The frozen LSTM's outputs for ``rows``, computed once at the evaluation batch into ``folder/name``
    (float32, one batch in RAM at a time, like the feature matrix itself)."""
    steps = int(np.prod(rows.shape[2:]))

    def outputs() -> Iterator[np.ndarray]:
        with torch.inference_mode(), autocast(device, precision):
            for batch in rows.batches(EVAL_BATCH):
                yield from head.rnn_outputs(torch.from_numpy(batch).to(device)).float().cpu().numpy()

    path = write_matrix(folder / f"{name}.npy", len(rows), (steps, head.rnn.hidden_size), "float32", outputs())
    return FeatureRows(open_matrix(path))


def fit_head(
    head: nn.Module,
    x_train,
    y_train: np.ndarray,
    x_val,
    y_val: np.ndarray,
    cfg: TrainConfig,
    seed: int,
    on_epoch: EpochCallback | None = None,
    cache_frozen_rnn: bool = True,
) -> FitResult:
    """Train ``head`` in place on feature maps; it ends holding the weights of the best validation loss.

    ``x_train``/``x_val`` are arrays, memmaps or lazy ``FeatureRows``: only one batch is in RAM at a time.
    ``cache_frozen_rnn``: for a paper head with a frozen LSTM, train on its outputs computed once (the same
    result, without the LSTM in every step); False runs the LSTM every step (for comparison).
    """
    xt = x_train if isinstance(x_train, FeatureRows) else FeatureRows(x_train)
    xv = x_val if isinstance(x_val, FeatureRows) else FeatureRows(x_val)
    device = resolve_device(getattr(cfg, "device", "cpu"))
    head.to(device)
    if not (cache_frozen_rnn and isinstance(head, PaperHead) and head.rnn_frozen):
        return _fit(head, head, xt, y_train, xv, y_val, cfg, seed, device, on_epoch)
    # A few hundred MB for thousands of images (VGG19: 100 KB per image, the size of its feature map)
    with tempfile.TemporaryDirectory(prefix="cxrnn-lstm-outputs-") as folder:
        precision = getattr(cfg, "precision", "fp32")
        st = rnn_output_rows(head, xt, Path(folder), "train", device, precision)
        sv = rnn_output_rows(head, xv, Path(folder), "val", device, precision)
        return _fit(head, FromRnnOutputs(head), st, y_train, sv, y_val, cfg, seed, device, on_epoch)


def _fit(head: nn.Module, model: nn.Module, xt: FeatureRows, y_train: np.ndarray, xv: FeatureRows, y_val: np.ndarray,
         cfg: TrainConfig, seed: int, device: torch.device, on_epoch: EpochCallback | None) -> FitResult:
    """The loop of ``fit_head``: ``model`` maps the rows ``xt``/``xv`` to logits and trains ``head``'s weights."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    precision = getattr(cfg, "precision", "fp32")
    yt, yv = torch.from_numpy(y_train).long().to(device), torch.from_numpy(y_val).long()
    has_val = len(xv) > 0
    has_batch_norm = any(isinstance(m, nn.BatchNorm1d) for m in head.modules())
    loss_fn = nn.CrossEntropyLoss()
    optimizer = make_optimizer(head.parameters(), cfg)
    result = FitResult()
    # One preallocated copy, overwritten in place: a fresh deepcopy per improvement briefly held two
    # (the paper head is ~120 M parameters, so each copy is ~0.5 GB)
    best_state = {k: v.detach().clone() for k, v in head.state_dict().items()}
    stale = 0
    start = time.perf_counter()
    for epoch in range(cfg.epochs):
        lr = lr_at(epoch, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        model.train()
        # Summed on the device and read once per epoch: a .item() per step would wait for every step
        total_loss = torch.zeros((), device=device)
        correct = torch.zeros((), dtype=torch.long, device=device)
        seen = 0
        for idx in _batches(len(xt), cfg.batch_size, generator):
            if len(idx) < 2 and has_batch_norm:
                continue  # BatchNorm cannot train on a batch of one
            targets = yt[idx]
            loss, logits = train_step(model, torch.from_numpy(xt[idx.numpy()]).to(device), targets, optimizer,
                                      loss_fn, device, precision)
            total_loss += loss * len(idx)
            correct += (logits.argmax(1) == targets).sum()
            seen += len(idx)
        row = {
            "epoch": epoch + 1,
            "lr": lr,
            "train_loss": total_loss.item() / max(1, seen),
            "train_acc": correct.item() / max(1, seen),
        }
        if has_val:
            logits = rows_logits(model, xv, device=str(device), precision=precision)
            row["val_loss"] = float(loss_fn(logits, yv))
            row["val_acc"] = float((logits.argmax(1) == yv).float().mean())
            monitored = row["val_loss"]
        else:
            monitored = row["train_loss"]
        row["seconds"] = time.perf_counter() - start
        result.history.append(row)
        if monitored < result.best_val_loss - 1e-6:
            result.best_val_loss = monitored
            result.best_epoch = epoch + 1
            with torch.no_grad():
                for name, value in head.state_dict().items():
                    best_state[name].copy_(value)
            stale = 0
        else:
            stale += 1
        if on_epoch:
            on_epoch(row)
        if cfg.patience and stale >= cfg.patience:
            break
    head.load_state_dict(best_state)
    head.to("cpu").eval()
    result.seconds = time.perf_counter() - start
    return result
