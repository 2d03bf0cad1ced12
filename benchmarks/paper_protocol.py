"""The paper's whole comparison on N phantom images, timed per stage, extrapolated to 6,939 images.

    python benchmarks/paper_protocol.py                      # 4 backbones, 240 images, 10 timed steps
    python benchmarks/paper_protocol.py --backbones vgg19 --steps 4
    python benchmarks/paper_protocol.py --quick              # smoke run: 1 backbone, 3 steps
    python benchmarks/paper_protocol.py --device cuda        # the same on a GPU (synchronised timing)

Protocol (the seed code's, via the ``paper`` preset): four backbones (vgg19, densenet121, inception_v3,
inception_resnet_v2) with ``--weights none`` (offline: random weights; the architecture sets the cost),
the paper head, 80/20 train+val/test split, 5 folds x 20 epochs over the 80 %, RMSprop, batch 16,
then each fold's validation and test pass.

Two heads, each timed in fp32 and bf16 (autocast, fp32 master weights):
- ``trainable LSTM``: cxrnn's default paper head (the LSTM trains; every step runs its forward and backward);
- ``--freeze-rnn``: the seed's head (LSTM at random init). Its outputs are a fixed function of the cached map,
  so ``fit_head`` computes them once per image per fit and each step trains batch norm + dense layers only
  (the LSTM's FLOP share of the step is 0; a forward hook counts the LSTM calls inside the timed and
  warm-up steps, printed beside it).

What is MEASURED in this run (per unit, on this machine, now):
- extraction: ``FeatureStore.extract`` (decode, hash, backbone forward, .npy write) on a few phantom
  images per backbone at batch 8, per image;
- head training step: the real paper head (``create_head`` with ``paper_head_options``) + the real
  optimizer (``make_optimizer`` with the paper preset: RMSprop), the inner step of ``fit_head`` (``train_step``)
  (forward, cross-entropy, zero_grad, backward, step, loss and accuracy summed on the device) on random
  inputs of the real shape (feature maps, or LSTM outputs for ``--freeze-rnn``), batch 16, ``--steps``
  steps after 2 warm-up steps, median;
- the LSTM-output cache (``--freeze-rnn``): ``rnn_output_rows`` (LSTM forward at batch 256 + .npy write)
  per image;
- validation/test pass: ``rows_logits`` (the fit code's evaluation) on one full batch of 256 random maps,
  per image, through the whole head and (``--freeze-rnn``, per-epoch validation) from the cached LSTM outputs;
- files: ``torch.save`` of the head's state dict (the kept model) and one best-weights copy (fit_head
  copies the state dict on every validation improvement, at most folds x epochs times);
- the seed's way: per training step, decode 16 phantom images + backbone forward + the same fp32 head step
  with the seed's head (frozen LSTM run forward every step); the backbone once on PyTorch eager (a plain
  port of the seed) and once on cxrnn's own extraction engine (the store's ONNX export), so that the ratio
  is not the runtime's gain alone. The seed's validation pass re-runs the backbone the same way;
- the floors: a 2048x2048 matmul (best of several, at the step's precision) for FLOP/s, a triad a = b + s*c
  on 256 MB arrays (best of several) for memory bandwidth. A shared machine's rates move with its
  neighbours' load, so each variant runs 4 rounds of (measure both rates, time a quarter of the steps):
  each round's steps against that round's floor, and the variant's "x floor" is the median of the 4
  ratios (``floors.rounds`` has each). The run's best rates give a second, stricter floor for every step
  (``floors_best_rates``, "x best").

What is EXTRAPOLATED (linearly; both extraction and head training grow linearly with the images):
- the whole protocol at N images and at 6,939 images: steps = folds x epochs x ceil(train per fold / 16),
  evaluation images = folds x (epochs x val per fold + val per fold + test), extraction = one pass over
  all images, LSTM cache = folds x (train + val per fold) images. Nothing here runs 5 x 20 epochs; every
  stage total is per-unit time x count.

Floors beside each head step (batch 16):
- compute: analytic FLOPs of the matmuls the step must do / the measured large-square matmul rate (a
  hardware floor: the step's batch-16 matmuls are skinny and no BLAS runs them at the square rate).
  Forward: the LSTM's input projection of all steps, its recurrent matmul on steps 1.. (h is 0 at step 0)
  and the dense layers. Backward: 2x forward for a matmul whose input needs a gradient, 1x (weight
  gradient only) for the input projection, whose input, the feature map, does not train. ``--freeze-rnn``
  has no LSTM work at all; its first dense layer still needs its input gradient (for the LSTM's batch norm).
  (This benchmark's first version counted 3x for every LSTM matmul, step 0 included: a higher floor
  than the step needs, which flattered the ratio.)
- memory: bytes the step must move: RMSprop over the trainable parameters (param and square_avg read and
  written, grad written by backward and read by the step: 6 x 4 bytes per parameter) plus the dense
  layers' fp32 weights read in forward and in backward (2 x 4 bytes per dense weight) / measured bandwidth;
- the measured step as a multiple of compute floor + memory floor (the sum: the optimizer's pass over
  memory comes after the matmuls; it cannot overlap them). bf16 rows use the bf16 matmul rate; their
  memory floor is the same fp32 bytes (master weights and optimizer state stay fp32).
How the step gets near its floor on a CPU (each change measured, see README "Speed"): the dense layers'
and the LSTM's batch-16 matmuls through oneDNN (``cpu_linear``; MKL's sgemm is slow at 16 rows), resident
weight gradients, the LSTM's recurrent weight reordered once per pass into oneDNN's blocked layout
(``packed_for_cpu_linear``), its backward through time with one recurrent-weight matmul for all steps
(``_ReluLSTMFn``), and RMSprop compiled into one pass over memory (``fused_rmsprop_update``, where PyTorch's
compiler works; else chunked). The JSON's ``machine.implementation`` says which of these this run used.
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


def best_of(fn, repeats: int, sync=lambda: None) -> float:
    best = math.inf
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t)
    return best


def synchronizer(device: torch.device):
    """Wait for the device's queued work (a CUDA kernel launch returns before the kernel ran)."""
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


def measure_matmul_rate(device: torch.device, dtype: torch.dtype = torch.float32, n: int = 2048,
                        repeats: int = 6) -> float:
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    torch.matmul(a, b, out=out)  # warm-up
    return 2.0 * n**3 / best_of(lambda: torch.matmul(a, b, out=out), repeats, synchronizer(device))


def measure_bandwidth(device: torch.device, megabytes: int = 256, repeats: int = 6) -> float:
    n = megabytes * (1 << 20) // 4
    a, b, c = torch.empty(n, device=device), torch.rand(n, device=device), torch.rand(n, device=device)
    torch.add(b, c, alpha=0.5, out=a)  # warm-up (pages touched)
    seconds = best_of(lambda: torch.add(b, c, alpha=0.5, out=a), repeats, synchronizer(device))
    return 3.0 * n * 4 / seconds  # read b, read c, write a


def head_flops(c: int, steps: int, units: int, dense: list[int], classes: int, frozen_cached: bool,
               batch: int = BATCH) -> dict[str, float]:
    """FLOPs of one training step's matmuls (elementwise work ignored), forward and backward as the step
    really runs them (see the module docstring)."""
    widths = [steps * units, *dense, classes]
    dense_f = sum(2.0 * batch * i * o for i, o in zip(widths[:-1], widths[1:]))
    projection = 2.0 * batch * steps * c * 4 * units
    recurrent = 2.0 * batch * (steps - 1) * units * 4 * units
    lstm_step = 0.0 if frozen_cached else 2.0 * projection + 3.0 * recurrent
    total = lstm_step + 3.0 * dense_f
    return {"lstm_fwd": projection + recurrent, "dense_fwd": dense_f, "lstm_step": lstm_step,
            "dense_step": 3.0 * dense_f, "step_total": total, "lstm_share": lstm_step / total}


def implementation() -> dict[str, str]:
    """Which of the head step's fast paths this process used (asked after the steps ran: both are chosen lazily)."""
    from cxrnn.models.heads import cpu_linear_backend
    from cxrnn.training.optim import rmsprop_backend

    return {"cpu_linear": cpu_linear_backend(), "rmsprop_update": rmsprop_backend()}


SEED_RUNTIMES = ("torch", "engine")
ROUNDS = 4  # rounds of (measure the floor's rates, time steps) per variant
VARIANTS = (("trainable", "fp32"), ("freeze_rnn", "fp32"), ("trainable", "bf16"), ("freeze_rnn", "bf16"))
LABELS = {"trainable": "trainable LSTM", "freeze_rnn": "--freeze-rnn (cached LSTM outputs)"}


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
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
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
    from cxrnn.features.matrix import FeatureRows
    from cxrnn.features.extractors import make_extractor
    from cxrnn.features.store import FeatureStore
    from cxrnn.inference.device import cpu_name, resolve_device
    from cxrnn.models.backbones import create_backbone
    from cxrnn.models.bundle import paper_head_options
    from cxrnn.models.heads import create_head
    from cxrnn.models.preprocess import to_input_tensor
    from cxrnn.training.config import PRESETS, TrainConfig
    from cxrnn.training.loop import EVAL_BATCH, FromRnnOutputs, rnn_output_rows, rows_logits, train_step
    from cxrnn.training.optim import make_optimizer

    device = resolve_device(args.device)
    sync = synchronizer(device)
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    print(f"{machine}: threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f}", flush=True)
    # The floors' rates are measured right before and right after each variant's steps (the best of the two):
    # on a shared machine the rates move with the neighbours' load, so a step is held against the hardware as
    # it was while the step ran. The run's best rates give a second, stricter floor for every step.
    best_rates = {"fp32": 0.0, "bf16": 0.0, "triad": 0.0}
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}

    def measure_rates(precision: str) -> dict[str, float]:
        measured = {"matmul": measure_matmul_rate(device, dtypes[precision]), "triad": measure_bandwidth(device)}
        best_rates[precision] = max(best_rates[precision], measured["matmul"])
        best_rates["triad"] = max(best_rates["triad"], measured["triad"])
        return measured

    def floors(flops: dict[str, float], bytes_moved: float, matmul_rate: float, triad: float, step_s: float) -> dict:
        compute_floor = flops["step_total"] / matmul_rate
        memory_floor = bytes_moved / triad
        return {"flops": flops, "bytes": bytes_moved, "matmul_flops_per_s": matmul_rate, "triad_bytes_per_s": triad,
                "compute_floor_s": compute_floor, "memory_floor_s": memory_floor,
                "floor_s": compute_floor + memory_floor, "step_over_floor": step_s / (compute_floor + memory_floor),
                "dominant": "memory" if memory_floor > compute_floor else "compute"}

    for precision in dtypes:
        measure_rates(precision)
    print(f"rates at the start: matmul 2048^2 fp32 {best_rates['fp32'] / 1e9:.1f} GFLOP/s, bf16 {best_rates['bf16'] / 1e9:.1f} "
          f"GFLOP/s, triad 256 MB {best_rates['triad'] / 1e9:.2f} GB/s", flush=True)

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
                "lstm_cache_images": args.folds * rest, "best_copies_max": args.folds * args.epochs}

    def timed_steps(step, inputs: torch.Tensor, targets: torch.Tensor, n: int) -> list[float]:
        for _ in range(2):  # warm-up: after other work the first steps fault their buffers back in
            step(inputs, targets)
        times = []
        for _ in range(n):
            sync()
            t = time.perf_counter()
            step(inputs, targets)
            sync()
            times.append(time.perf_counter() - t)
        return times

    rows = []
    for name in backbones:
        print(f"\n== {name}", flush=True)
        backbone = create_backbone(name, args.weights).to(device)
        spec = backbone.spec
        size = backbone.preprocessing.input_size
        with torch.inference_mode():  # warm-up at the extraction batch (oneDNN primitive creation), not timed
            fmap = backbone(torch.zeros(8, 3, size, size, device=device))
        c, h, w = fmap.shape[1:]
        assert c == spec.feature_channels, (c, spec.feature_channels)

        # 1. extraction: the real store, a few images at batch 8, after an untimed extraction of other images
        # (the store's engine is set up on first use: a one-off cost per run, not a per-image one)
        store = FeatureStore(backbone, work / "cache", device=str(device))
        sub = paths[: args.extract_images]
        store.extract(paths[args.extract_images : 2 * args.extract_images], batch_size=8, warn=lambda m: None)
        t = time.perf_counter()
        store.extract(sub, batch_size=8, warn=lambda m: None)
        extract_per_image = (time.perf_counter() - t) / len(sub)

        y = torch.from_numpy(np.arange(BATCH) % classes).long().to(device)
        # one full evaluation batch: a smaller one would overstate the per-batch costs (e.g. autocast's weight casts)
        rows_eval = np.random.default_rng(0).standard_normal((EVAL_BATCH, c, h, w)).astype(np.float32)
        variants: dict[str, dict] = {}
        for kind, precision in VARIANTS:
            # 2. head step: the real head and optimizer, fit_head's inner step, random inputs of the real shape
            frozen = kind == "freeze_rnn"
            options = paper_head_options(spec, {}, freeze_rnn=frozen)
            torch.manual_seed(0)
            head = create_head("paper", c, h * w, classes, **options).to(device)
            optimizer = make_optimizer(head.parameters(), cfg)
            forward = head.from_rnn_outputs if frozen else head
            inputs = (torch.randn(BATCH, h * w, options["lstm_units"], device=device).relu() if frozen
                      else torch.randn(BATCH, c, h, w, device=device))
            total_loss = torch.zeros((), device=device)
            correct = torch.zeros((), dtype=torch.long, device=device)

            def step(x: torch.Tensor, targets: torch.Tensor) -> None:
                nonlocal total_loss, correct
                loss, logits = train_step(forward, x, targets, optimizer, loss_fn, device, precision)
                total_loss += loss * len(targets)
                correct += (logits.argmax(1) == targets).sum()

            lstm_calls: list[int] = []
            hook = head.rnn.register_forward_hook(lambda m, i, o: lstm_calls.append(1))
            head.train()
            trainable = sum(p.numel() for p in head.parameters() if p.requires_grad)
            dense_weights = sum(m.weight.numel() for m in [*head.dense.modules(), head.classifier]
                                if isinstance(m, nn.Linear))
            fl = head_flops(c, h * w, options["lstm_units"], list(options["dense"]), classes, frozen_cached=frozen)
            bytes_moved = 4.0 * (6 * trainable + 2 * dense_weights)
            # rounds of (the floor's rates, then a few steps): each round's steps are held against the rates
            # measured just before them, so both see the machine in the same state
            times, rounds = [], []
            per_round = max(2, math.ceil(args.steps / ROUNDS))
            for _ in range(ROUNDS):
                measured = measure_rates(precision)
                round_times = timed_steps(step, inputs, y, per_round)
                times += round_times
                rounds.append(floors(fl, bytes_moved, measured["matmul"], measured["triad"],
                                     float(np.median(round_times))))
            hook.remove()
            step_s = float(np.median(times))
            ratios = [r["step_over_floor"] for r in rounds]
            floor = {**min(rounds, key=lambda r: abs(r["step_over_floor"] - np.median(ratios))),
                     "step_over_floor": float(np.median(ratios)), "rounds": rounds}

            # 3. evaluation (validation / test): rows_logits at its batch 256, through the whole head; and,
            # for --freeze-rnn, the LSTM-output cache and the per-epoch validation from it
            # the second of two full passes: a training run makes hundreds, the first one sets up oneDNN's primitives
            rows_logits(head, rows_eval, device=str(device), precision=precision)
            sync()
            t = time.perf_counter()
            rows_logits(head, rows_eval, device=str(device), precision=precision)
            eval_per_image = (time.perf_counter() - t) / len(rows_eval)
            cache_per_image = from_rnn_per_image = 0.0
            if frozen:
                t = time.perf_counter()
                cached = rnn_output_rows(head, FeatureRows(rows_eval), work, f"{name}-lstm", device, precision)
                cache_per_image = (time.perf_counter() - t) / len(rows_eval)
                rows_logits(FromRnnOutputs(head), cached, device=str(device), precision=precision)
                t = time.perf_counter()
                rows_logits(FromRnnOutputs(head), cached, device=str(device), precision=precision)
                from_rnn_per_image = (time.perf_counter() - t) / len(rows_eval)
            variants[f"{kind}_{precision}"] = {
                "head": kind, "label": LABELS[kind], "precision": precision,
                "lstm_units": options["lstm_units"], "dense": list(options["dense"]),
                "trainable_params": trainable, "dense_weights": dense_weights,
                "head_step_s": step_s, "head_step_times_s": times, "lstm_forward_calls_in_steps": len(lstm_calls),
                "eval_s_per_image": eval_per_image, "lstm_cache_s_per_image": cache_per_image,
                "eval_from_lstm_outputs_s_per_image": from_rnn_per_image,
                "floors": floor,  # the rates measured beside the steps; "floors_best_rates": the run's best
            }
            print(f"{name} {LABELS[kind]}, {precision}: {trainable / 1e6:.0f} M trainable; step {step_s:.3f} s | "
                  f"compute floor {floor['compute_floor_s']:.3f} s ({fl['step_total'] / 1e9:.1f} GFLOP, LSTM share "
                  f"{fl['lstm_share']:.0%}, LSTM calls in steps {len(lstm_calls)}) + memory floor "
                  f"{floor['memory_floor_s']:.3f} s ({bytes_moved / 1e9:.2f} GB) -> {floor['step_over_floor']:.2f}x "
                  f"floor", flush=True)
            if kind == "trainable" and precision == "fp32":
                # 4. files: the kept model's weights, and fit_head's best-weights copy (the same for every variant)
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
                sync()
                copy_s = time.perf_counter() - t
                del best
            if kind == "freeze_rnn" and precision == "fp32":
                # 5. the seed's way: every training batch decoded and pushed through the backbone again, then the
                # fp32 step of the seed's head (its frozen LSTM runs forward every step). The backbone on two
                # runtimes: PyTorch eager (a plain port of the seed) and cxrnn's own extraction engine (the store's:
                # ONNX Runtime for fp32 on the CPU), so the ratio is not a runtime's gain alone.
                head.train()
                forward = head
                engine = make_extractor(backbone, store.runtime, device, "fp32", store.directory / "backbone.onnx",
                                        warn=lambda m: None)
                runtimes = {"torch": lambda xb: backbone(xb),
                            "engine": lambda xb: torch.from_numpy(engine(xb)).to(device)}
                seed = {}
                for runtime, run_backbone in runtimes.items():
                    backbone_times, step_times = [], []
                    for s in range(-1, args.seed_steps):  # s = -1: warm-up at batch 16, not timed
                        idx = [(max(s, 0) * BATCH + i) % len(paths) for i in range(BATCH)]
                        sync()
                        t = time.perf_counter()
                        xb = to_input_tensor([read_image(paths[i]) for i in idx], backbone.preprocessing).to(device)
                        with torch.inference_mode():
                            fm = run_backbone(xb)
                        sync()
                        t_map = time.perf_counter()
                        step(fm.clone(), torch.from_numpy(labels[idx]).long().to(device))
                        sync()
                        if s >= 0:
                            backbone_times.append(t_map - t)
                            step_times.append(time.perf_counter() - t_map)
                    seed[runtime] = {
                        "runtime": "torch" if runtime == "torch" else engine.name,
                        "decode_and_backbone_s_per_image": float(np.median(backbone_times)) / BATCH,
                        "head_step_s": float(np.median(step_times)),
                        "step_s": float(np.median(np.add(backbone_times, step_times))),
                        "step_times_s": list(np.add(backbone_times, step_times))}
                seed_eval_per_image = eval_per_image
                del engine, runtimes
            head = optimizer = forward = None  # freed before the next variant's head is built

        def protocol(n: int, v: dict) -> dict[str, float]:
            k = counts(n)
            frozen = v["head"] == "freeze_rnn"
            per_epoch_eval = v["eval_from_lstm_outputs_s_per_image"] if frozen else v["eval_s_per_image"]
            stages = {"extraction_s": n * extract_per_image,
                      "lstm_cache_s": k["lstm_cache_images"] * v["lstm_cache_s_per_image"],
                      "head_train_s": k["steps"] * v["head_step_s"],
                      "eval_s": (args.folds * args.epochs * k["val_per_fold"] * per_epoch_eval
                                 + args.folds * (k["val_per_fold"] + k["test"]) * v["eval_s_per_image"]),
                      "files_s": save_s + k["best_copies_max"] * copy_s}
            stages["total_s"] = sum(stages.values())
            stages["total_h"] = stages["total_s"] / 3600
            return {**k, **stages}

        def seed_protocol(n: int, way: dict) -> dict[str, float]:
            # the seed's validation pass also re-ran the backbone (decode + forward per image) before the head
            k = counts(n)
            per_image = way["decode_and_backbone_s_per_image"] + seed_eval_per_image
            epoch = k["steps_per_epoch"] * way["step_s"] + k["val_per_fold"] * per_image
            total = (args.folds * args.epochs * epoch + args.folds * (k["val_per_fold"] + k["test"]) * per_image
                     + save_s + k["best_copies_max"] * copy_s)
            return {**k, "epoch_s": epoch, "total_s": total, "total_h": total / 3600}

        seed_at = {runtime: {**way, "at_N": seed_protocol(len(paths), way), "at_6939": seed_protocol(PAPER_IMAGES, way)}
                   for runtime, way in seed.items()}
        for v in variants.values():
            v["protocol_at_N"] = protocol(len(paths), v)
            v["protocol_at_6939"] = protocol(PAPER_IMAGES, v)
            v["seed_over_this_total"] = {runtime: way["at_6939"]["total_s"] / v["protocol_at_6939"]["total_s"]
                                         for runtime, way in seed_at.items()}
        rows.append({
            "backbone": name, "input_size": size, "feature_map": [int(c), int(h), int(w)],
            "measured": {"extract_s_per_image": extract_per_image, "extract_images": len(sub),
                         "model_save_s": save_s, "model_bytes": model_bytes, "best_copy_s": copy_s,
                         "seed_step_s": {runtime: way["step_s"] for runtime, way in seed_at.items()}},
            "variants": variants,
            "seed_way": seed_at,
        })
        del backbone, store

    for r in rows:  # the stricter floor: the run's best rates
        for v in r["variants"].values():
            v["floors_best_rates"] = floors(v["floors"]["flops"], v["floors"]["bytes"], best_rates[v["precision"]],
                                            best_rates["triad"], v["head_step_s"])

    payload = {
        "note": ("Per-unit times are measured in this run; every protocol total (at N and at 6,939 images) is "
                 "extrapolated linearly from them: steps = folds x epochs x ceil(train per fold / 16), "
                 "extraction = one pass over all images, evaluation = validation every epoch + each fold's "
                 "final validation and test pass, LSTM cache (--freeze-rnn) = each fold's train + validation "
                 "images once. Nothing ran the 5 x 20 epochs. The seed's way is measured in fp32 with the seed's "
                 "head (frozen LSTM, run every step) and the backbone re-run on every batch, on two runtimes: "
                 "'torch' (PyTorch eager) and 'engine' (cxrnn's extraction engine, ONNX Runtime on the CPU); "
                 "seed_over_this_total gives the ratio against each."),
        "machine": {"device": str(device), "name": machine, "threads": torch.get_num_threads(),
                    "implementation": implementation(),
                    "load_average": os.getloadavg()[0],
                    "best_matmul_flops_per_s": {k: best_rates[k] for k in dtypes}, "best_triad_bytes_per_s": best_rates["triad"]},
        "protocol": {"folds": args.folds, "epochs": args.epochs, "batch": BATCH, "test_size": cfg.test_size,
                     "optimizer": cfg.optimizer, "weights": args.weights},
        "data": {"images": len(paths), "size": args.size, "classes": classes, "timed_steps": args.steps,
                 "seed_steps": args.seed_steps},
        "backbones": rows,
        "total_6939_h": {key: sum(r["variants"][key]["protocol_at_6939"]["total_h"] for r in rows)
                         for key in rows[0]["variants"]} if rows else {},
        "seed_total_6939_h": {runtime: sum(r["seed_way"][runtime]["at_6939"]["total_h"] for r in rows)
                              for runtime in SEED_RUNTIMES},
    }
    atomic_write_json(args.out, payload)

    print(f"\nhead step (batch 16; measured, median of {args.steps}) vs its floors, from the rates measured beside it "
          f"(x floor) and from the run's best rates (x best: matmul fp32 {best_rates['fp32'] / 1e9:.1f}, bf16 "
          f"{best_rates['bf16'] / 1e9:.1f} GFLOP/s; triad {best_rates['triad'] / 1e9:.2f} GB/s)")
    print(f"{'backbone':<20}{'head':<37}{'prec':<6}{'params':>7}{'step s':>8}{'compute':>9}{'memory':>8}"
          f"{'x floor':>8}{'x best':>8}{'LSTM share':>11}")
    for r in rows:
        for v in r["variants"].values():
            f = v["floors"]
            print(f"{r['backbone']:<20}{v['label']:<37}{v['precision']:<6}{v['trainable_params'] / 1e6:>6.0f}M"
                  f"{v['head_step_s']:>8.3f}{f['compute_floor_s']:>9.3f}{f['memory_floor_s']:>8.3f}"
                  f"{f['step_over_floor']:>8.2f}{v['floors_best_rates']['step_over_floor']:>8.2f}"
                  f"{f['flops']['lstm_share']:>10.0%}")
    print(f"\nwhole protocol EXTRAPOLATED linearly to {PAPER_IMAGES} images (hours; {args.folds} folds x {args.epochs} "
          f"epochs, from per-unit times measured on {len(paths)} phantom images); seed's way = the backbone re-run "
          f"on every batch, PyTorch eager / cxrnn's extraction engine")
    keys = list(rows[0]["variants"]) if rows else []
    print(f"{'backbone':<20}{'seed way':>17}" + "".join(f"{k:>30}" for k in keys))

    def line(label: str, seed_h: dict, totals: list[float]) -> str:
        cells = "".join(f"{h:>12.2f} h ({seed_h['torch'] / h:>4.1f}x / {seed_h['engine'] / h:>4.1f}x)" for h in totals)
        return f"{label:<20}{seed_h['torch']:>7.2f} / {seed_h['engine']:>5.2f} h{cells}"

    for r in rows:
        seed_h = {runtime: r["seed_way"][runtime]["at_6939"]["total_h"] for runtime in SEED_RUNTIMES}
        print(line(r["backbone"], seed_h, [v["protocol_at_6939"]["total_h"] for v in r["variants"].values()]))
    if rows:
        print(line("all four", payload["seed_total_6939_h"], [payload["total_6939_h"][k] for k in keys]))
    print("(N x: the seed's way over this one, whole protocol; seed's backbone on PyTorch eager / on cxrnn's engine)")
    print(f"implementation: {payload['machine']['implementation']}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
