"""Training from the feature cache vs. re-running the frozen backbone every epoch (the seed's way).

    python benchmarks/train_speed.py                                # vgg19 (weights none) + lstm head
    python benchmarks/train_speed.py --backbone efficientnet_lite0 --weights imagenet --per-class 40
    python benchmarks/train_speed.py --head paper                  # the seed's 120 M-parameter head

Same phantom data for every measurement:
1. ``one_pass_s``: one backbone pass over all images into an empty feature store (decode included).
2. E epochs of head training from the cache vs. E epochs the seed's way, where every batch is decoded
   and pushed through the frozen backbone again before the head's step (both measured).
3. ``paper_protocol``: ``cxrnn train`` with 5 folds x 20 epochs (all epochs, no early stop) on the warm
   cache, whole run timed (listing, hashing, matrix, folds, evaluation, files); compared with one pass.
   ``seed_style_estimate_s`` = folds x epochs x one_pass_s x (non-test share of images) + the cached
   run: the seed pushed each fold's training and validation images through the backbone every epoch.
The ratio depends on backbone cost vs. head cost, not on the number of images (both grow linearly).
Writes benchmarks/results/train_speed.json.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cxrnn.utils.atomic import atomic_write_json

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="vgg19")
    parser.add_argument("--weights", default="none")
    parser.add_argument("--head", default="lstm")
    parser.add_argument("--per-class", type=int, default=12)
    parser.add_argument("--size", type=int, default=128, help="phantom image side")
    parser.add_argument("--epochs", type=int, default=2, help="E for the measured cached-vs-seed comparison")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--protocol-epochs", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=RESULTS / "train_speed.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from cxrnn.data.dataset import load_dataset
    from cxrnn.data.io import read_image
    from cxrnn.data.phantom import PhantomConfig, generate_phantom
    from cxrnn.data.splits import train_val_test_split
    from cxrnn.features.matrix import FeatureRows
    from cxrnn.features.store import FeatureStore
    from cxrnn.models.backbones import create_backbone
    from cxrnn.models.bundle import build_network
    from cxrnn.models.preprocess import to_input_tensor
    from cxrnn.training.config import PRESETS, TrainConfig
    from cxrnn.training.loop import fit_head
    from cxrnn.training.optim import make_optimizer
    from cxrnn.training import train

    work = Path(tempfile.mkdtemp(prefix="cxrnn-speed-"))
    data = work / "phantom"
    generate_phantom(data, PhantomConfig(per_class=args.per_class, size=args.size, seed=11))
    dataset = load_dataset(data)
    paths = [s.path for s in dataset.samples]
    labels = dataset.labels()
    backbone = create_backbone(args.backbone, args.weights)
    cache = work / "cache"

    t = time.perf_counter()
    extracted = FeatureStore(backbone, cache).extract(paths)
    one_pass_s = time.perf_counter() - t
    print(f"{len(paths)} images, {args.backbone}: one backbone pass {one_pass_s:.1f} s", flush=True)

    split = train_val_test_split(labels, 0.2, 0.1, 0, None)
    paper = {k: v for k, v in PRESETS["paper"].items() if k not in ("head",)}
    cfg = TrainConfig(backbone=args.backbone, head=args.head, **{**paper, "epochs": args.epochs})

    def new_head():
        torch.manual_seed(0)
        net, _ = build_network(backbone, args.head, len(dataset.classes), {})
        return net.freeze_backbone()

    feats = extracted.features
    net = new_head()
    t = time.perf_counter()
    fit_head(net.head, FeatureRows(feats, split.train), labels[split.train], FeatureRows(feats, split.val),
             labels[split.val], cfg, seed=0)
    cached_s = time.perf_counter() - t

    # the seed's way: every epoch decodes the images and runs the frozen backbone again
    net = new_head()
    optimizer = make_optimizer(net.head.parameters(), cfg)
    loss_fn = nn.CrossEntropyLoss()
    rng = np.random.default_rng(0)
    t = time.perf_counter()
    for _ in range(args.epochs):
        order = rng.permutation(split.train)
        net.head.train()
        for b in range(0, len(order), cfg.batch_size):
            idx = order[b : b + cfg.batch_size]
            if len(idx) < 2:
                continue
            x = to_input_tensor([read_image(paths[i]) for i in idx], backbone.preprocessing)
            with torch.inference_mode():
                fmap = backbone(x)
            loss = loss_fn(net.head(fmap.clone()), torch.from_numpy(labels[idx]).long())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        with torch.inference_mode():  # the seed's validation pass, also through the backbone
            net.head.eval()
            for b in range(0, len(split.val), 32):
                idx = split.val[b : b + 32]
                net.head(backbone(to_input_tensor([read_image(paths[i]) for i in idx], backbone.preprocessing)))
    seed_s = time.perf_counter() - t
    print(f"{args.epochs} epochs of {args.head} head: from cache {cached_s:.1f} s, seed's way {seed_s:.1f} s "
          f"({seed_s / cached_s:.1f}x)", flush=True)

    proto = TrainConfig(data=str(data), backbone=args.backbone, weights=args.weights, head=args.head,
                        out=str(work / "run"), cache_dir=str(cache), folds=args.folds, **{**paper,
                        "epochs": args.protocol_epochs, "patience": 0})
    proto.preset = "paper"
    t = time.perf_counter()
    result = train(proto)
    cached_total_s = time.perf_counter() - t
    non_test = 1 - len(split.test) / len(labels)
    seed_estimate = args.folds * args.protocol_epochs * one_pass_s * non_test + cached_total_s
    protocol = {"one_pass_s": one_pass_s, "cached_total_s": cached_total_s,
                "ratio_to_one_pass": cached_total_s / one_pass_s, "seed_style_estimate_s": seed_estimate,
                "folds": args.folds, "epochs": args.protocol_epochs, "fit_s": result.timings.get("fit_s"),
                "test_accuracy": result.metrics.get("accuracy")}
    print(f"paper protocol, {args.head} head, {args.folds} folds x {args.protocol_epochs} epochs from the cache: {cached_total_s:.1f} s "
          f"= {protocol['ratio_to_one_pass']:.2f}x one pass ({one_pass_s:.1f} s); the seed's way ~{seed_estimate:.0f} s "
          f"(estimate)")

    payload = {
        "machine": {"threads": torch.get_num_threads(), "load_average": os.getloadavg()[0]},
        "data": {"images": len(paths), "size": args.size, "train": int(len(split.train)), "val": int(len(split.val))},
        "backbone": args.backbone, "weights": args.weights, "head": args.head,
        "cached_vs_seed": {"epochs": args.epochs, "cached_s": cached_s, "seed_style_s": seed_s,
                           "ratio": seed_s / cached_s},
        "paper_protocol": protocol,
    }
    atomic_write_json(args.out, payload)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
