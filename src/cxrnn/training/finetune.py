"""``--finetune``: train backbone and head end to end on images, with train-time rotation.

Slower than the cached-feature path (every epoch runs the backbone), so it is opt-in. Under torchrun
it trains with DistributedDataParallel: a DistributedSampler gives each process its share of every
global batch (``batch_size`` is the global batch, split across processes), gradients are averaged, and
validation/test predictions are gathered so every process makes the same early-stopping decision. The backbone's
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
from scipy import ndimage
from torch import nn

from cxrnn.data.dataset import Dataset
from cxrnn.data.splits import train_val_test_split
from cxrnn.evaluation.scoring import write_evaluation
from cxrnn.evaluation.honest import split_groups
from cxrnn.evaluation.metrics import compute_metrics
from cxrnn.evaluation.report import write_report
from cxrnn.models.backbones import create_backbone
from cxrnn.models.bundle import ModelBundle, build_network, save_bundle
from cxrnn.models.preprocess import to_input_tensor
from cxrnn.training.config import TrainConfig
from cxrnn.utils import distributed
from cxrnn.inference import device as runtime
from cxrnn.training.loop import FitResult, lr_at, make_optimizer


def _load_resized(dataset: Dataset, prep, strict: bool, log: Callable[[str], None], workers: int = 0,
                  image_cache: str | None = None):
    """Every readable image at the input size (decoded in ``workers`` processes, optionally cached)."""
    from cxrnn.data.loading import DecodedImageCache, ImageFiles, image_loader
    from cxrnn.utils.hashing import file_digest

    paths = [s.path for s in dataset.samples]
    cache = DecodedImageCache(image_cache) if image_cache else None
    digests = None
    if cache is not None:
        digests = []
        for p in paths:
            try:
                digests.append(file_digest(p))
            except OSError:
                digests.append(None)  # the reader reports the file below
    images, kept, errors = [], [], []
    for batch in image_loader(ImageFiles(paths, prep, digests=digests, cache=cache), 16, workers):
        for item in batch:
            if item.error is not None:
                if strict:
                    raise item.error
                log(f"skipped {item.error}")
                errors.append(str(item.error))
                continue
            images.append(item.image)
            kept.append(item.index)
    return images, kept, errors


def _augment(image: np.ndarray, max_degrees: float, seed: int, epoch: int, index: int) -> np.ndarray:
    # one generator per (seed, epoch, image): the same image gets the same rotation in any process layout
    return _rotate(image, max_degrees, np.random.default_rng([seed, epoch, index]))


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


def _predict(net: nn.Module, images: list[np.ndarray], prep, batch_size: int = 32, device: str = "cpu",
             precision: str = "fp32") -> torch.Tensor:
    """Float32 CPU logits; under torchrun each process predicts a share and the shares are gathered."""
    info = distributed.info()
    dev = runtime.resolve_device(device)
    mine = list(range(info.rank, len(images), info.world_size))
    net.eval()
    out = []
    with torch.inference_mode(), runtime.autocast(dev, precision):
        for start in range(0, len(mine), batch_size):
            x = to_input_tensor([images[i] for i in mine[start : start + batch_size]], prep)
            out.append(net(runtime.to_device_input(x, dev)).float().cpu())
    logits = torch.cat(out) if out else torch.zeros((0, 0))
    if not info.enabled:
        return logits
    parts = distributed.all_gather_objects((mine, logits.numpy()))
    merged = [None] * len(images)
    for positions, values in parts:
        for pos, row in zip(positions, values):
            merged[pos] = row
    return torch.from_numpy(np.stack(merged)) if images else logits


def train_finetune(cfg: TrainConfig, dataset: Dataset, run_dir: Path, progress=None, log=None):
    from cxrnn.training.run import TrainResult, _data_summary, _write_history, group_array

    log = log or (lambda msg: None)
    dist_info = distributed.setup(runtime.resolve_device(cfg.device))
    device = distributed.local_device(runtime.resolve_device(cfg.device))
    world = dist_info.world_size
    if cfg.batch_size % world:
        raise ValueError(f"--batch-size {cfg.batch_size} (the global batch) must be a multiple of the "
                         f"{world} processes")
    backbone = create_backbone(cfg.backbone, cfg.weights, seed=cfg.seed)
    prep = backbone.preprocessing
    images, kept, skipped = _load_resized(dataset, prep, cfg.strict, log, cfg.workers, cfg.image_cache)
    labels = dataset.labels()[kept]
    groups = group_array(dataset, cfg.group_by)
    groups = groups[kept] if groups is not None else None
    # Copies of one image must not straddle the split here either (hashes are cached, so every torchrun
    # process computes the same groups).
    groups, dedup_info = split_groups([str(dataset.samples[i].path) for i in kept], groups, cfg.dedup,
                                      cfg.near_duplicate_threshold, cfg.cache_dir, log, cfg.align_threshold)
    split = train_val_test_split(labels, cfg.test_size, cfg.val_size, cfg.seed, groups)
    head_options = dict(cfg.head_options)
    if cfg.head == "paper":
        head_options.setdefault("lstm_units", backbone.spec.paper_head.lstm_units)
        head_options.setdefault("dense", list(backbone.spec.paper_head.dense))
        head_options.setdefault("freeze_rnn", cfg.freeze_rnn)
    torch.manual_seed(cfg.seed)
    net, hw = build_network(backbone, cfg.head, len(dataset.classes), head_options)
    backbone.requires_grad_(True)
    runtime.prepare_module(net, device)
    model: nn.Module = net
    if dist_info.enabled:
        if device.type == "cuda":  # batch statistics over the global batch, as one process would see them
            net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
        # the timm model's own classifier sits after forward_features and never gets a gradient
        model = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None,
                                                    find_unused_parameters=True)
    # The pretrained backbone learns at a tenth of the head's rate (backbone_lr_scale): at the head's rate
    # (AdamW 1e-3) the demo's lite0 + bilstm collapsed to chance in the first epoch and never recovered.
    optimizer = make_optimizer([{"params": list(net.backbone.parameters()), "lr_scale": cfg.backbone_lr_scale},
                                {"params": list(net.head.parameters())}], cfg)
    loss_fn = nn.CrossEntropyLoss()
    # the same global batches in any process layout: one permutation per epoch, each process a strided share
    sampler = torch.utils.data.distributed.DistributedSampler(
        split.train, num_replicas=world, rank=dist_info.rank, shuffle=True, seed=cfg.seed)
    local_batch = cfg.batch_size // world
    result = FitResult()
    best_state = copy.deepcopy(net.state_dict())
    stale = 0
    start = time.perf_counter()
    y_val = torch.from_numpy(labels[split.val]).long()
    for epoch in range(cfg.epochs):
        lr = lr_at(epoch, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        _set_train_mode(net)
        sampler.set_epoch(epoch)
        order = split.train[np.fromiter(iter(sampler), dtype=np.int64)]
        total, correct, seen = 0.0, 0, 0
        for b in range(0, len(order), local_batch):
            idx = order[b : b + local_batch]
            if len(idx) < 2 and cfg.batch_size > 1:
                continue  # BatchNorm in the head cannot train on one image (same on every process)
            x = to_input_tensor([_augment(images[i], cfg.rotation, cfg.seed, epoch, int(i)) for i in idx], prep)
            y = torch.from_numpy(labels[idx]).long().to(device)
            with runtime.autocast(device, cfg.precision):
                logits = model(runtime.to_device_input(x, device)).float()
                loss = loss_fn(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(idx)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(idx)
        total, correct, seen = distributed.all_reduce_sum([total, correct, seen])
        row = {"epoch": epoch + 1, "lr": lr, "train_loss": total / max(1, seen), "train_acc": correct / max(1, seen)}
        if len(split.val):
            logits = _predict(net, [images[i] for i in split.val], prep, device=str(device), precision=cfg.precision)
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
    test_logits = _predict(net, [images[i] for i in split.test], prep, device=str(device), precision=cfg.precision)
    net.to("cpu")
    test_probs = torch.softmax(test_logits, dim=1).numpy()
    if not dist_info.is_main:  # rank 0 writes the run; the others only helped train
        return TrainResult(run_dir=run_dir, model_path=run_dir / "model.pt", metrics={}, history=result.history,
                           timings={"fit_s": time.perf_counter() - start}, skipped=skipped)
    classes = dataset.classes
    metrics = compute_metrics(labels[split.test], test_probs, classes)
    metrics["split"] = {"train": int(len(split.train)), "val": int(len(split.val)), "test": int(len(split.test)),
                        "seed": cfg.seed, "group_by": cfg.group_by, **dedup_info}
    test_paths = [str(dataset.samples[kept[i]].path) for i in split.test]
    write_evaluation(run_dir, labels[split.test], test_probs, classes, test_paths, metrics)
    weights_id = f"finetuned:{backbone.weights_id}"
    bundle = ModelBundle(net=net, classes=list(classes), preprocessing=prep, backbone_name=backbone.spec.name,
                         weights_id=weights_id, head_name=cfg.head, head_options=head_options, feature_hw=hw,
                         config=cfg.to_dict(),
                         metrics={k: metrics[k] for k in ("n", "accuracy", "macro_f1", "macro_auc")},
                         extras={"training_data": _data_summary(dataset, labels, split)})
    from cxrnn.models.ood import fine_tuned_ood_extras

    ood = fine_tuned_ood_extras(net, [images[i] for i in np.concatenate([split.train, split.val])], prep, log)
    if ood is not None:
        bundle.extras["ood"] = ood
    model_path = save_bundle(bundle, run_dir / "model.pt")
    _write_history(run_dir / "history.csv", result.history)
    out = TrainResult(run_dir=run_dir, model_path=model_path, metrics=metrics, history=result.history,
                      timings={"fit_s": time.perf_counter() - start}, skipped=skipped)
    write_report(run_dir, cfg, out)
    return out
