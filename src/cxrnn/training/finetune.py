"""``--finetune``: train backbone and head end to end on images, with train-time rotation.

Slower than the cached-feature path (every epoch runs the backbone), so it is opt-in. Only the fit lives
here; the split before it and the calibration, intervals, model file and report after it are the same
as for a frozen run (``cxrnn.training.run``).

Under torchrun it trains with DistributedDataParallel: a DistributedSampler gives each process its share
of every global batch (``batch_size`` is the global batch, split across processes), gradients are
averaged, and validation/test predictions are gathered so every process makes the same early-stopping
decision. The backbone's BatchNorm layers keep their ImageNet statistics: batches of 16 chest X-rays are
too small and too uniform to re-estimate them.

A fine-tuned backbone is a new network: its weights id is derived from its weights' content, so the
feature store never hands one fine-tuned model the maps of another (``audit --model`` uses the store).
"""

from __future__ import annotations

import copy
import math
import numpy as np
import torch
from scipy import ndimage
from torch import nn

from cxrnn.audit.phash import hash_side
from cxrnn.data.dataset import Dataset
from cxrnn.data.loading import DecodedImageCache, ImageFiles, digest_files, image_loader
from cxrnn.inference.device import autocast, prepare_module, resolve_device, to_device_input
from cxrnn.models.backbones import create_backbone
from cxrnn.models.bundle import build_network
from cxrnn.models.preprocess import input_transform, to_input_tensor
from cxrnn.training.config import TrainConfig
from cxrnn.training.frozen import head_options_for
from cxrnn.training.loop import FitResult, lr_at
from cxrnn.training.optim import make_optimizer
from cxrnn.training.run import FittedModel, Log, PreparedData, Progress, prepare_data, timer
from cxrnn.utils import distributed


def fine_tuned_weights_id(net: nn.Module, base: str) -> str:
    """``finetuned:<base>:<digest of the backbone's weights>``: equal only for equal weights."""
    from cxrnn.utils.hashing import state_digest

    return f"finetuned:{base}:{state_digest(net.backbone.state_dict())[:16]}"


def _load_resized(paths: list[str], prep, cfg: TrainConfig, log: Log):
    """Every readable image at the input size (decoded in ``cfg.workers`` processes, optionally cached),
    with the files' digests and, where an image was decoded, its duplicate hashes."""
    cache = DecodedImageCache(cfg.image_cache) if cfg.image_cache else None
    digests, read_errors = digest_files(paths, cfg.strict, log)
    errors = [str(e) for e in read_errors]
    transform, tag = input_transform(prep)
    readable = [i for i, d in enumerate(digests) if d is not None]
    files = ImageFiles(paths, transform, tag, positions=readable, digests=digests, cache=cache,
                       side=hash_side if cfg.dedup else None)
    images, kept, hashes = [], [], []
    for batch in image_loader(files, 16, cfg.workers):
        for item in batch:
            if item.error is not None:
                if cfg.strict:
                    raise item.error
                log(f"skipped {item.error}")
                errors.append(str(item.error))
                digests[item.index] = None
                continue
            images.append(item.image)
            kept.append(item.index)
            if item.side is not None:
                hashes.append(item.side)
    return images, kept, digests, errors, hashes


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
    dev = resolve_device(device)
    mine = list(range(info.rank, len(images), info.world_size))
    net.eval()
    out = []
    with torch.inference_mode(), autocast(dev, precision):
        for start in range(0, len(mine), batch_size):
            x = to_input_tensor([images[i] for i in mine[start : start + batch_size]], prep)
            out.append(net(to_device_input(x, dev)).float().cpu())
    logits = torch.cat(out) if out else torch.zeros((0, 0))
    if not info.enabled:
        return logits
    parts = distributed.all_gather_objects((mine, logits.numpy()))
    merged = [None] * len(images)
    for positions, values in parts:
        for pos, row in zip(positions, values):
            merged[pos] = row
    return torch.from_numpy(np.stack(merged)) if images else logits


def fit_finetune(cfg: TrainConfig, dataset: Dataset, progress: Progress | None = None, log: Log | None = None
                 ) -> tuple[PreparedData, FittedModel] | None:
    """Decode, split and train backbone + head end to end; None on torchrun ranks other than 0."""
    log = log or (lambda msg: None)
    if cfg.leave_one_source_out:
        raise ValueError("--leave-one-source-out trains one head per source on cached features; "
                         "it does not run with --finetune")
    if cfg.folds:
        log("--folds is for frozen-backbone runs: fine-tuning uses one validation split")
    dist_info = distributed.setup(resolve_device(cfg.device))
    device = distributed.local_device(resolve_device(cfg.device))
    world = dist_info.world_size
    if cfg.batch_size % world:
        raise ValueError(f"--batch-size {cfg.batch_size} (the global batch) must be a multiple of the "
                         f"{world} processes")
    backbone = create_backbone(cfg.backbone, cfg.weights, seed=cfg.seed, input_size=cfg.input_size)
    base_weights = backbone.weights_id
    prep = backbone.preprocessing
    images_all, kept, digests, skipped, hashes = _load_resized([str(s.path) for s in dataset.samples], prep, cfg, log)
    # Copies of one image must not straddle the split here either (every torchrun process decodes every
    # image, so each computes the same groups).
    data = prepare_data(cfg, dataset, kept, digests, skipped, log, val_size=cfg.val_size, hashes=hashes)
    images = images_all  # position r holds the image of data row r
    labels, split = data.labels, data.split
    head_options = head_options_for(backbone, cfg)
    torch.manual_seed(cfg.seed)
    net, hw = build_network(backbone, cfg.head, len(dataset.classes), head_options)
    backbone.requires_grad_(True)
    prepare_module(net, device)
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
    elapsed = timer()
    y_val = torch.from_numpy(labels[split.val]).long()

    def logits_of(rows: np.ndarray) -> np.ndarray:
        return _predict(net, [images[i] for i in rows], prep, device=str(device), precision=cfg.precision).numpy()

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
            with autocast(device, cfg.precision):
                logits = model(to_device_input(x, device)).float()
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
            val_logits = torch.from_numpy(logits_of(split.val))
            row["val_loss"] = float(loss_fn(val_logits, y_val))
            row["val_acc"] = float((val_logits.argmax(1) == y_val).float().mean())
        monitored = row.get("val_loss", row["train_loss"])
        row["seconds"] = elapsed()
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
    calibration_logits, test_logits = logits_of(split.val), logits_of(split.test)
    fit_seconds = elapsed()
    net.to("cpu")
    if not dist_info.is_main:  # rank 0 writes the run; the others only helped train
        return None

    def pooled_features(rows: np.ndarray, batch_size: int = 32) -> np.ndarray:
        pooled = []
        with torch.inference_mode():
            for start in range(0, len(rows), batch_size):
                fmap = net.backbone(to_input_tensor([images[i] for i in rows[start : start + batch_size]], prep))
                pooled.append(fmap.mean(dim=(2, 3)).double().numpy())
        return np.concatenate(pooled) if pooled else np.zeros((0, 0))

    return data, FittedModel(
        net=net, preprocessing=prep, weights_id=fine_tuned_weights_id(net, base_weights), head_options=head_options,
        feature_hw=hw, history=result.history, calibration_rows=split.val, calibration_logits=calibration_logits,
        test_logits=test_logits, pooled_features=pooled_features, timings={"fit_s": fit_seconds})
