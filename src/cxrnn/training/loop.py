"""Fitting a head on cached feature maps (the default) with early stopping on validation loss."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn

from cxrnn.inference.device import autocast, resolve_device
from cxrnn.features.matrix import FeatureRows
from cxrnn.training.config import TrainConfig

EpochCallback = Callable[[dict], None]


@dataclass
class FitResult:
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    best_val_loss: float = math.inf
    seconds: float = 0.0


def make_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    """``params``: parameters, or param-group dicts (a group's ``lr_scale`` multiplies the schedule's lr)."""
    params = list(params)
    if params and isinstance(params[0], dict):
        params = [{**g, "params": [p for p in g["params"] if p.requires_grad]} for g in params]
        for g in params:
            g.setdefault("lr_scale", 1.0)
            g["lr"] = cfg.lr * g["lr_scale"]
    else:
        params = [p for p in params if p.requires_grad]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "rmsprop":
        # Keras RMSprop defaults: rho 0.9, eps 1e-7 (PyTorch's alpha is Keras' rho)
        return torch.optim.RMSprop(params, lr=cfg.lr, alpha=0.9, eps=1e-7, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)


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


def rows_logits(model: nn.Module, rows, batch_size: int = 256, device: str = "cpu",
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


def fit_head(
    head: nn.Module,
    x_train,
    y_train: np.ndarray,
    x_val,
    y_val: np.ndarray,
    cfg: TrainConfig,
    seed: int,
    on_epoch: EpochCallback | None = None,
) -> FitResult:
    """Train ``head`` in place on feature maps; it ends holding the weights of the best validation loss.

    ``x_train``/``x_val`` are arrays, memmaps or lazy ``FeatureRows``: only one batch is in RAM at a time.
    """
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    device = resolve_device(getattr(cfg, "device", "cpu"))
    precision = getattr(cfg, "precision", "fp32")
    head.to(device)
    xt = x_train if isinstance(x_train, FeatureRows) else FeatureRows(x_train)
    xv = x_val if isinstance(x_val, FeatureRows) else FeatureRows(x_val)
    yt, yv = torch.from_numpy(y_train).long().to(device), torch.from_numpy(y_val).long()
    has_val = len(xv) > 0
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
        head.train()
        total_loss, correct, seen = 0.0, 0, 0
        for idx in _batches(len(xt), cfg.batch_size, generator):
            if len(idx) < 2 and any(isinstance(m, nn.BatchNorm1d) for m in head.modules()):
                continue  # BatchNorm cannot train on a batch of one
            with autocast(device, precision):
                logits = head(torch.from_numpy(xt[idx.numpy()]).to(device))
                loss = loss_fn(logits.float(), yt[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total_loss += loss.item() * len(idx)
            correct += int((logits.argmax(1) == yt[idx]).sum())
            seen += len(idx)
        row = {
            "epoch": epoch + 1,
            "lr": lr,
            "train_loss": total_loss / max(1, seen),
            "train_acc": correct / max(1, seen),
        }
        if has_val:
            logits = rows_logits(head, xv, device=str(device), precision=precision)
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
