"""``--finetune``: train backbone and head end to end on images, with train-time rotation.

Slower than the cached-feature path (every epoch runs the backbone), so it is opt-in. The backbone's
BatchNorm layers keep their ImageNet statistics: batches of 16 chest X-rays are too small and too
uniform to re-estimate them.
"""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

from cxrnn.data.dataset import Dataset
from cxrnn.data.io import ImageReadError, read_image
from cxrnn.data.splits import train_val_test_split
from cxrnn.evaluation.evaluate import write_evaluation
from cxrnn.evaluation.metrics import compute_metrics
from cxrnn.evaluation.report import write_report
from cxrnn.models.backbones import create_backbone
from cxrnn.models.bundle import ModelBundle, build_network, save_bundle
from cxrnn.models.preprocess import to_input_tensor
from cxrnn.training.config import TrainConfig
from cxrnn.training.loop import FitResult, lr_at, make_optimizer


def _load_resized(dataset: Dataset, size: int, strict: bool, log: Callable[[str], None]):
    images, kept, errors = [], [], []
    for i, sample in enumerate(dataset.samples):
        try:
            image = read_image(sample.path)
        except ImageReadError as err:
            if strict:
                raise
            log(f"skipped {err}")
            errors.append(str(err))
            continue
        t = torch.from_numpy(image)[None, None]
        images.append(F.interpolate(t, size=(size, size), mode="bilinear", antialias=True)[0, 0].numpy())
        kept.append(i)
    return images, kept, errors


def _rotate(image: np.ndarray, max_degrees: float, rng: np.random.Generator) -> np.ndarray:
    if max_degrees <= 0:
        return image
    angle = rng.uniform(-max_degrees, max_degrees)
    return ndimage.rotate(image, angle, reshape=False, order=1, mode="nearest")  # Keras fill_mode="nearest"


def _set_train_mode(net: nn.Module) -> None:
    net.train()
    for module in net.backbone.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


def _predict(net: nn.Module, images: list[np.ndarray], prep, batch_size: int = 32) -> torch.Tensor:
    net.eval()
    out = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            out.append(net(to_input_tensor(images[start : start + batch_size], prep)))
    return torch.cat(out) if out else torch.zeros((0, 0))


def train_finetune(cfg: TrainConfig, dataset: Dataset, run_dir: Path, progress=None, log=None):
    from cxrnn.training.trainer import TrainResult, _data_summary, _write_history, group_array

    log = log or (lambda msg: None)
    backbone = create_backbone(cfg.backbone, cfg.weights, seed=cfg.seed)
    prep = backbone.preprocessing
    images, kept, skipped = _load_resized(dataset, prep.input_size, cfg.strict, log)
    labels = dataset.labels()[kept]
    groups = group_array(dataset, cfg.group_by)
    groups = groups[kept] if groups is not None else None
    split = train_val_test_split(labels, cfg.test_size, cfg.val_size, cfg.seed, groups)
    head_options = dict(cfg.head_options)
    if cfg.head == "paper":
        head_options.setdefault("lstm_units", backbone.spec.paper_head.lstm_units)
        head_options.setdefault("dense", list(backbone.spec.paper_head.dense))
        head_options.setdefault("freeze_rnn", cfg.freeze_rnn)
    torch.manual_seed(cfg.seed)
    net, hw = build_network(backbone, cfg.head, len(dataset.classes), head_options)
    backbone.requires_grad_(True)
    optimizer = make_optimizer(net.parameters(), cfg)
    loss_fn = nn.CrossEntropyLoss()
    rng = np.random.default_rng(cfg.seed)
    result = FitResult()
    best_state = copy.deepcopy(net.state_dict())
    stale = 0
    start = time.perf_counter()
    y_val = torch.from_numpy(labels[split.val]).long()
    for epoch in range(cfg.epochs):
        lr = lr_at(epoch, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        _set_train_mode(net)
        order = rng.permutation(split.train)
        total, correct, seen = 0.0, 0, 0
        for b in range(0, len(order), cfg.batch_size):
            idx = order[b : b + cfg.batch_size]
            if len(idx) < 2:
                continue
            x = to_input_tensor([_rotate(images[i], cfg.rotation, rng) for i in idx], prep)
            y = torch.from_numpy(labels[idx]).long()
            logits = net(x)
            loss = loss_fn(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(idx)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(idx)
        row = {"epoch": epoch + 1, "lr": lr, "train_loss": total / max(1, seen), "train_acc": correct / max(1, seen)}
        if len(split.val):
            logits = _predict(net, [images[i] for i in split.val], prep)
            row["val_loss"] = float(loss_fn(logits, y_val))
            row["val_acc"] = float((logits.argmax(1) == y_val).float().mean())
        monitored = row.get("val_loss", row["train_loss"])
        row["seconds"] = time.perf_counter() - start
        result.history.append(row)
        if progress:
            progress("epoch", epoch + 1, cfg.epochs)
        if monitored < result.best_val_loss - 1e-6 or math.isinf(result.best_val_loss):
            result.best_val_loss, result.best_epoch, stale = monitored, epoch + 1, 0
            best_state = copy.deepcopy(net.state_dict())
        else:
            stale += 1
        if cfg.patience and stale >= cfg.patience:
            break
    net.load_state_dict(best_state)
    net.eval()
    test_probs = torch.softmax(_predict(net, [images[i] for i in split.test], prep), dim=1).numpy()
    classes = dataset.classes
    metrics = compute_metrics(labels[split.test], test_probs, classes)
    metrics["split"] = {"train": int(len(split.train)), "val": int(len(split.val)), "test": int(len(split.test)),
                        "seed": cfg.seed, "group_by": cfg.group_by}
    test_paths = [str(dataset.samples[kept[i]].path) for i in split.test]
    write_evaluation(run_dir, labels[split.test], test_probs, classes, test_paths, metrics)
    weights_id = f"finetuned:{backbone.weights_id}"
    bundle = ModelBundle(net=net, classes=list(classes), preprocessing=prep, backbone_name=backbone.spec.name,
                         weights_id=weights_id, head_name=cfg.head, head_options=head_options, feature_hw=hw,
                         config=cfg.to_dict(),
                         metrics={k: metrics[k] for k in ("n", "accuracy", "macro_f1", "macro_auc")},
                         extras={"training_data": _data_summary(dataset, labels, split)})
    model_path = save_bundle(bundle, run_dir / "model.pt")
    _write_history(run_dir / "history.csv", result.history)
    out = TrainResult(run_dir=run_dir, model_path=model_path, metrics=metrics, history=result.history,
                      timings={"fit_s": time.perf_counter() - start}, skipped=skipped)
    write_report(run_dir, cfg, out)
    return out
