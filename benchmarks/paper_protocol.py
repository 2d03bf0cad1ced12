"""The paper's whole comparison on N phantom images, timed per stage, extrapolated to 6,939 images.

    python benchmarks/paper_protocol.py                      # 4 backbones, 240 images, 10 timed steps
    python benchmarks/paper_protocol.py --backbones vgg19 --steps 4
    python benchmarks/paper_protocol.py --quick              # smoke run: 1 backbone, 3 steps

Protocol (the seed code's, via the ``paper`` preset): four backbones (vgg19, densenet121, inception_v3,
inception_resnet_v2) with ``--weights none`` (offline: random weights; the architecture sets the cost),
the paper head, 80/20 train+val/test split, 5 folds x 20 epochs over the 80 %, RMSprop, batch 16, fp32,
then each fold's validation and test pass.

What is MEASURED in this run (per unit, on this machine, now):
- extraction: ``FeatureStore.extract`` (decode, hash, backbone forward, .npy write) on a few phantom
  images per backbone at batch 8, per image;
- head training step: the real paper head (``create_head`` with ``paper_head_options``) + the real
  optimizer (``make_optimizer`` with the paper preset: RMSprop), the same inner step as ``fit_head``
  (forward, cross-entropy, zero_grad, backward, step, ``loss.item()``) on random feature maps of the
  backbone's real shape, batch 16, ``--steps`` steps after 2 warm-up steps;
- validation/test pass: ``rows_logits`` (the fit code's evaluation, batch 256) per image;
- files: ``torch.save`` of the head's state dict (the kept model) and one best-weights copy (fit_head
  copies the state dict on every validation improvement, at most folds x epochs times);
- the seed's way: per training step, decode 16 phantom images + backbone forward + the same head step;
- the floors: a 2048x2048 fp32 matmul (best of several) for FLOP/s, a triad a = b + s*c on 256 MB
  arrays (best of several) for memory bandwidth.

What is EXTRAPOLATED (linearly; both extraction and head training grow linearly with the images):
- the whole protocol at N images and at 6,939 images: steps = folds x epochs x ceil(train per fold / 16),
  evaluation images = folds x (epochs x val per fold + val per fold + test), extraction = one pass over
  all images. Nothing here runs 5 x 20 epochs; every stage total is per-unit time x count.

Floors beside each head step (batch 16, fp32):
- compute: analytic FLOPs of the LSTM (input projection of all steps + the recurrent matmul per step)
  and the dense layers, forward x 3 (backward ~ 2x forward for matmuls) / measured matmul FLOP/s;
- memory: bytes the step must move: RMSprop over the trainable parameters (param, square_avg read and
  written, grad written by backward and read by the step: 6 x 4 bytes per parameter) plus the dense
  layers' weights read in forward and in backward (2 x 4 bytes per dense weight) / measured bandwidth;
- the measured step as a multiple of compute floor + memory floor.
Writes benchmarks/results/paper_protocol.json.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cxrnn.utils.atomic import atomic_write_json

RESULTS = Path(__file__).resolve().parent / "results"
PAPER_BACKBONES = ("vgg19", "densenet121", "inception_v3", "inception_resnet_v2")
PAPER_IMAGES = 6939
BATCH = 16


def best_of(fn, repeats: int) -> float:
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def measure_matmul_rate(n: int = 2048, repeats: int = 6) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    out = torch.empty(n, n)
    torch.matmul(a, b, out=out)  # warm-up
    return 2.0 * n**3 / best_of(lambda: torch.matmul(a, b, out=out), repeats)


def measure_bandwidth(megabytes: int = 256, repeats: int = 6) -> float:
    n = megabytes * (1 << 20) // 4
    a, b, c = torch.empty(n), torch.rand(n), torch.rand(n)
    torch.add(b, c, alpha=0.5, out=a)  # warm-up (pages touched)
    seconds = best_of(lambda: torch.add(b, c, alpha=0.5, out=a), repeats)
    return 3.0 * n * 4 / seconds  # read b, read c, write a


def head_flops(c: int, steps: int, units: int, dense: list[int], classes: int, batch: int = BATCH) -> dict[str, float]:
    """Forward FLOPs of the paper head's matmuls (elementwise work ignored); backward ~ 2x forward."""
    lstm = 2.0 * batch * steps * c * 4 * units + 2.0 * batch * steps * units * 4 * units
    widths = [steps * units, *dense, classes]
    dense_f = sum(2.0 * batch * i * o for i, o in zip(widths[:-1], widths[1:]))
    return {"lstm_fwd": lstm, "dense_fwd": dense_f, "step_total": 3.0 * (lstm + dense_f),
            "lstm_share": lstm / (lstm + dense_f)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=240, help="N phantom images")
    parser.add_argument("--backbones", default=",".join(PAPER_BACKBONES))
    parser.add_argument("--weights", default="none")
    parser.add_argument("--steps", type=int, default=10, help="timed head steps (after 2 warm-up steps)")
    parser.add_argument("--seed-steps", type=int, default=2, help="timed steps of the seed's way")
    parser.add_argument("--extract-images", type=int, default=8)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--size", type=int, default=256, help="phantom image side (resized to the backbone's input)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="smoke run: first backbone only, 3 steps, 1 seed step")
    parser.add_argument("--out", type=Path, default=RESULTS / "paper_protocol.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    backbones = [b.strip() for b in args.backbones.split(",") if b.strip()]
    if args.quick:
        backbones, args.steps, args.seed_steps = backbones[:1], 3, 1

    from cxrnn.data.dataset import load_dataset
    from cxrnn.data.io import read_image
    from cxrnn.data.phantom import PhantomConfig, generate_phantom
    from cxrnn.features.store import FeatureStore
    from cxrnn.models.backbones import create_backbone
    from cxrnn.models.bundle import paper_head_options
    from cxrnn.models.heads import create_head
    from cxrnn.models.preprocess import to_input_tensor
    from cxrnn.training.config import PRESETS, TrainConfig
    from cxrnn.training.loop import make_optimizer, rows_logits

    print(f"threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f}", flush=True)
    flops_rate = measure_matmul_rate()
    bandwidth = measure_bandwidth()
    print(f"floors: fp32 matmul 2048^2 {flops_rate / 1e9:.1f} GFLOP/s, triad 256 MB {bandwidth / 1e9:.2f} GB/s",
          flush=True)

    work = Path(tempfile.mkdtemp(prefix="cxrnn-paper-protocol-"))
    probe = PhantomConfig(per_class=1, size=8, seed=0)
    generate_phantom(work / "probe", probe)
    n_classes = len(load_dataset(work / "probe").classes)
    t = time.perf_counter()
    generate_phantom(work / "phantom", PhantomConfig(per_class=math.ceil(args.images / n_classes), size=args.size,
                                                     seed=11))
    dataset = load_dataset(work / "phantom")
    paths = [s.path for s in dataset.samples][: args.images]
    labels = dataset.labels()[: args.images]
    classes = len(dataset.classes)
    print(f"{len(paths)} phantom images ({classes} classes, {args.size} px) in {time.perf_counter() - t:.1f} s",
          flush=True)

    paper = {k: v for k, v in PRESETS["paper"].items() if k != "head"}
    cfg = TrainConfig(head="paper", **{**paper, "epochs": args.epochs})
    loss_fn = nn.CrossEntropyLoss()

    def counts(n: int) -> dict[str, int]:
        n_test = round(n * cfg.test_size)
        rest = n - n_test
        val = rest // args.folds
        train = rest - val
        steps_epoch = math.ceil(train / BATCH)
        return {"images": n, "test": n_test, "train_per_fold": train, "val_per_fold": val,
                "steps_per_epoch": steps_epoch, "steps": args.folds * args.epochs * steps_epoch,
                "eval_images": args.folds * (args.epochs * val + val + n_test),
                "best_copies_max": args.folds * args.epochs}

    rows = []
    for name in backbones:
        print(f"\n== {name}", flush=True)
        backbone = create_backbone(name, args.weights)
        spec = backbone.spec
        size = backbone.preprocessing.input_size
        with torch.inference_mode():  # warm-up at the extraction batch (oneDNN primitive creation), not timed
            fmap = backbone(torch.zeros(8, 3, size, size))
        c, h, w = fmap.shape[1:]
        assert c == spec.feature_channels, (c, spec.feature_channels)

        # 1. extraction: the real store, a few images at batch 8, after an untimed extraction of other images
        # (the store's engine is set up on first use: a one-off cost per run, not a per-image one)
        store = FeatureStore(backbone, work / "cache")
        sub = paths[: args.extract_images]
        store.extract(paths[args.extract_images : 2 * args.extract_images], batch_size=8, warn=lambda m: None)
        t = time.perf_counter()
        store.extract(sub, batch_size=8, warn=lambda m: None)
        extract_per_image = (time.perf_counter() - t) / len(sub)

        # 2. head step: the real head and optimizer, the fit_head inner step, random maps of the real shape
        options = paper_head_options(spec, {}, freeze_rnn=False)
        torch.manual_seed(0)
        head = create_head("paper", c, h * w, classes, **options)
        optimizer = make_optimizer(head.parameters(), cfg)
        x = torch.randn(BATCH, c, h, w)
        y = torch.from_numpy(np.arange(BATCH) % classes).long()

        def step(inputs: torch.Tensor, targets: torch.Tensor) -> None:
            logits = head(inputs)
            loss = loss_fn(logits.float(), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss.item()

        head.train()
        for _ in range(2):
            step(x, y)
        times = []
        for _ in range(args.steps):
            t = time.perf_counter()
            step(x, y)
            times.append(time.perf_counter() - t)
        step_s = float(np.median(times))

        trainable = sum(p.numel() for p in head.parameters() if p.requires_grad)
        dense_weights = sum(m.weight.numel() for m in [*head.dense.modules(), head.classifier]
                            if isinstance(m, nn.Linear))
        fl = head_flops(c, h * w, options["lstm_units"], list(options["dense"]), classes)
        bytes_moved = 4.0 * (6 * trainable + 2 * dense_weights)
        compute_floor = fl["step_total"] / flops_rate
        memory_floor = bytes_moved / bandwidth

        # 3. evaluation pass (validation / test): rows_logits at its batch 256
        rows_eval = np.random.default_rng(0).standard_normal((32, c, h, w)).astype(np.float32)
        rows_logits(head, rows_eval[:4])
        t = time.perf_counter()
        rows_logits(head, rows_eval)
        eval_per_image = (time.perf_counter() - t) / len(rows_eval)

        # 4. files: the kept model's weights, and fit_head's best-weights copy
        t = time.perf_counter()
        torch.save(head.state_dict(), work / f"{name}-head.pt")
        save_s = time.perf_counter() - t
        model_bytes = (work / f"{name}-head.pt").stat().st_size
        (work / f"{name}-head.pt").unlink()
        best = {k: v.detach().clone() for k, v in head.state_dict().items()}
        t = time.perf_counter()
        with torch.no_grad():
            for k, v in head.state_dict().items():
                best[k].copy_(v)
        copy_s = time.perf_counter() - t
        del best

        # 5. the seed's way: decode + backbone forward on every training batch, then the same head step
        head.train()
        seed_times = []
        for s in range(-1, args.seed_steps):  # s = -1: warm-up at batch 16, not timed
            idx = [(max(s, 0) * BATCH + i) % len(paths) for i in range(BATCH)]
            t = time.perf_counter()
            xb = to_input_tensor([read_image(paths[i]) for i in idx], backbone.preprocessing)
            with torch.inference_mode():
                fm = backbone(xb)
            step(fm.clone(), torch.from_numpy(labels[idx]).long())
            if s >= 0:
                seed_times.append(time.perf_counter() - t)
        seed_step_s = float(np.median(seed_times))
        # the seed's validation pass also re-ran the backbone; its forward share is the extraction's
        # per-image time (decode + forward; the .npy write is a slight overestimate)

        def protocol(n: int) -> dict[str, float]:
            k = counts(n)
            stages = {"extraction_s": n * extract_per_image,
                      "head_train_s": k["steps"] * step_s,
                      "eval_s": k["eval_images"] * eval_per_image,
                      "files_s": save_s + k["best_copies_max"] * copy_s}
            stages["total_s"] = sum(stages.values())
            stages["total_h"] = stages["total_s"] / 3600
            seed_epoch = k["steps_per_epoch"] * seed_step_s + k["val_per_fold"] * (extract_per_image + eval_per_image)
            cached_epoch = k["steps_per_epoch"] * step_s + k["val_per_fold"] * eval_per_image
            seed_total = (args.folds * args.epochs * seed_epoch
                          + args.folds * (k["val_per_fold"] + k["test"]) * (extract_per_image + eval_per_image)
                          + stages["files_s"])
            return {**k, **stages, "seed_epoch_s": seed_epoch, "cached_epoch_s": cached_epoch,
                    "seed_over_cached_epoch": seed_epoch / cached_epoch, "seed_total_h": seed_total / 3600,
                    "seed_over_cached_total": seed_total / stages["total_s"]}

        row = {
            "backbone": name, "input_size": size, "feature_map": [int(c), int(h), int(w)],
            "head": {"lstm_units": options["lstm_units"], "dense": list(options["dense"]),
                     "trainable_params": trainable, "dense_weights": dense_weights},
            "measured": {
                "extract_s_per_image": extract_per_image, "extract_images": len(sub),
                "head_step_s": step_s, "head_step_times_s": times, "eval_s_per_image": eval_per_image,
                "model_save_s": save_s, "model_bytes": model_bytes, "best_copy_s": copy_s,
                "seed_step_s": seed_step_s, "seed_step_times_s": seed_times,
            },
            "floors": {"flops": fl, "bytes": bytes_moved, "compute_floor_s": compute_floor,
                       "memory_floor_s": memory_floor, "floor_s": compute_floor + memory_floor,
                       "step_over_floor": step_s / (compute_floor + memory_floor),
                       "dominant": "memory" if memory_floor > compute_floor else "compute"},
            "protocol_at_N": protocol(len(paths)),
            "protocol_at_6939": protocol(PAPER_IMAGES),
        }
        rows.append(row)
        f = row["floors"]
        print(f"{name}: map {c}x{h}x{w}, {trainable / 1e6:.0f} M params; step {step_s:.3f} s | compute floor "
              f"{compute_floor:.3f} s ({fl['step_total'] / 1e9:.1f} GFLOP) + memory floor {memory_floor:.3f} s "
              f"({bytes_moved / 1e9:.2f} GB) -> {f['step_over_floor']:.2f}x floor; seed step {seed_step_s:.2f} s",
              flush=True)
        del head, optimizer, backbone, store

    payload = {
        "note": ("Per-unit times are measured in this run; every protocol total (at N and at 6,939 images) is "
                 "extrapolated linearly from them: steps = folds x epochs x ceil(train per fold / 16), "
                 "extraction = one pass over all images, evaluation = validation every epoch + each fold's "
                 "final validation and test pass. Nothing ran the 5 x 20 epochs."),
        "machine": {"threads": torch.get_num_threads(), "load_average": os.getloadavg()[0],
                    "matmul_flops_per_s": flops_rate, "triad_bytes_per_s": bandwidth},
        "protocol": {"folds": args.folds, "epochs": args.epochs, "batch": BATCH, "test_size": cfg.test_size,
                     "optimizer": cfg.optimizer, "precision": "fp32", "weights": args.weights},
        "data": {"images": len(paths), "size": args.size, "classes": classes, "timed_steps": args.steps,
                 "seed_steps": args.seed_steps},
        "backbones": rows,
        "total_6939_h": sum(r["protocol_at_6939"]["total_h"] for r in rows),
        "seed_total_6939_h": sum(r["protocol_at_6939"]["seed_total_h"] for r in rows),
    }
    atomic_write_json(args.out, payload)

    print(f"\nhead step (batch 16, fp32; measured) vs its floors (measured matmul {flops_rate / 1e9:.1f} GFLOP/s, "
          f"triad {bandwidth / 1e9:.2f} GB/s)")
    hdr = f"{'backbone':<20}{'params':>8}{'step s':>9}{'compute':>9}{'memory':>9}{'x floor':>9}{'dominant':>10}"
    print(hdr)
    for r in rows:
        f = r["floors"]
        print(f"{r['backbone']:<20}{r['head']['trainable_params'] / 1e6:>7.0f}M{r['measured']['head_step_s']:>9.3f}"
              f"{f['compute_floor_s']:>9.3f}{f['memory_floor_s']:>9.3f}{f['step_over_floor']:>9.2f}{f['dominant']:>10}")
    print(f"\nwhole protocol EXTRAPOLATED linearly to {PAPER_IMAGES} images (hours; {args.folds} folds x {args.epochs} "
          f"epochs, from per-unit times measured on {len(paths)} phantom images)")
    print(f"{'backbone':<20}{'extract':>9}{'train':>9}{'eval':>9}{'files':>9}{'total':>9}{'seed way':>10}"
          f"{'seed/cxrnn':>11}{'per epoch':>10}")
    for r in rows:
        p = r["protocol_at_6939"]
        print(f"{r['backbone']:<20}{p['extraction_s'] / 3600:>9.2f}{p['head_train_s'] / 3600:>9.2f}"
              f"{p['eval_s'] / 3600:>9.2f}{p['files_s'] / 3600:>9.2f}{p['total_h']:>9.2f}{p['seed_total_h']:>10.2f}"
              f"{p['seed_over_cached_total']:>10.2f}x{p['seed_over_cached_epoch']:>9.2f}x")
    print(f"{'all four':<20}{'':>45}{payload['total_6939_h']:>9.2f}{payload['seed_total_6939_h']:>10.2f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
