"""Peak resident memory of head training vs. dataset size, through the real training code path.

    python benchmarks/memory.py                       # 1,000 / 5,000 / 20,000 images, fp16 store
    python benchmarks/memory.py --sizes 1000 --dtype float32

Extracting 20,000 real images would take hours on a small CPU, so the feature store is SIMULATED: a
matrix of random feature maps with the largest per-image map among the paper backbones at 224 px
(InceptionV3: 2048 x 5 x 5; VGG19 is 512 x 7 x 7, DenseNet121 1024 x 7 x 7), written in the store's
on-disk format. Each size then trains a head for one epoch in a fresh process exactly as ``cxrnn train``
does (``fit_head`` over lazy ``FeatureRows`` of the memory-mapped matrix, then test-set probabilities),
and the child's peak RSS (ru_maxrss) is recorded. For comparison, the old way (every map stacked into
a float32 array in RAM) is measured where it fits in ``--in-ram-max`` images.
Writes benchmarks/results/memory.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from cxrnn.utils.atomic import atomic_write_json

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = {"inception_v3": (2048, 5, 5), "densenet121": (1024, 7, 7), "vgg19": (512, 7, 7)}


def child(args: argparse.Namespace) -> None:
    import torch

    from cxrnn.features.matrix import FeatureRows, open_matrix
    from cxrnn.models.heads import create_head
    from cxrnn.training.config import TrainConfig
    from cxrnn.training.loop import fit_head, rows_logits

    torch.set_num_threads(1)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    matrix = open_matrix(args.matrix)
    n = len(matrix)
    labels = np.arange(n) % 3
    order = np.random.default_rng(0).permutation(n)
    test, val, train = order[: n // 5], order[n // 5 : n // 5 + n // 10], order[n // 5 + n // 10 :]
    if args.in_ram:  # the previous behaviour: all maps stacked in RAM as float32
        matrix = np.asarray(matrix, dtype=np.float32)
    start = time.perf_counter()
    c = matrix.shape[1]
    head = create_head(args.head, c, matrix.shape[2] * matrix.shape[3], 3)
    cfg = TrainConfig(epochs=1, batch_size=32, patience=0)
    fit_head(head, FeatureRows(matrix, train), labels[train], FeatureRows(matrix, val), labels[val], cfg, seed=0)
    torch.softmax(rows_logits(head, FeatureRows(matrix, test)), dim=1)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_rss_mib": peak / 1024, "baseline_rss_mib": baseline / 1024,
                      "seconds": time.perf_counter() - start}))


def write_synthetic(path: Path, n: int, shape: tuple[int, ...], dtype: str) -> None:
    from cxrnn.features.matrix import write_matrix

    rng = np.random.default_rng(0)

    def rows():
        for _ in range(n):
            yield rng.standard_normal(shape, dtype=np.float32)

    write_matrix(path, n, shape, dtype, rows())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", type=int, default=[1000, 5000, 20000])
    parser.add_argument("--backbone-shape", choices=sorted(SHAPES), default="inception_v3")
    parser.add_argument("--dtype", choices=["float16", "float32"], default="float16")
    parser.add_argument("--head", default="pool", help="head trained for the epoch (memory barely depends on it)")
    parser.add_argument("--in-ram-max", type=int, default=5000, help="largest size also run the old in-RAM way")
    parser.add_argument("--workdir", type=Path, default=None, help="where the synthetic stores go (needs disk)")
    parser.add_argument("--out", type=Path, default=RESULTS / "memory.json")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--matrix", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--in-ram", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    shape = SHAPES[args.backbone_shape]
    row_mib = np.prod(shape) * np.dtype(args.dtype).itemsize / 2**20
    work = Path(tempfile.mkdtemp(prefix="cxrnn-mem-", dir=args.workdir))
    rows = []
    try:
        for n in args.sizes:
            path = work / f"features-{n}.npy"
            t = time.perf_counter()
            write_synthetic(path, n, shape, args.dtype)
            print(f"{n} images: synthetic store {path.stat().st_size / 2**30:.2f} GiB written in "
                  f"{time.perf_counter() - t:.0f} s", flush=True)
            for in_ram in ([False, True] if n <= args.in_ram_max else [False]):
                cmd = [sys.executable, __file__, "--child", "--matrix", str(path), "--head", args.head]
                out = subprocess.run(cmd + (["--in-ram"] if in_ram else []), check=True, capture_output=True,
                                     text=True).stdout
                result = json.loads(out.strip().splitlines()[-1])
                row = {"images": n, "feature_shape": list(shape), "store_dtype": args.dtype,
                       "store_gib": path.stat().st_size / 2**30, "mode": "in_ram_float32" if in_ram else "memmap_batches",
                       "head": args.head, **result}
                rows.append(row)
                print(f"  {row['mode']:15s} peak RSS {row['peak_rss_mib']:7.0f} MiB "
                      f"(after imports {row['baseline_rss_mib']:.0f} MiB), epoch+test {row['seconds']:.0f} s", flush=True)
            path.unlink()
    finally:
        for leftover in work.glob("*"):
            leftover.unlink()
        work.rmdir()
    print("\nimages  store GiB  mode             peak RSS MiB")
    for r in rows:
        print(f"{r['images']:6d} {r['store_gib']:9.2f}  {r['mode']:15s} {r['peak_rss_mib']:10.0f}")
    limit = 2048
    worst = max((r["peak_rss_mib"] for r in rows if r["mode"] == "memmap_batches"), default=0)
    print(f"largest memmap peak {worst:.0f} MiB vs the 2 GiB target: {'met' if worst < limit else 'NOT met'}")
    payload = {"simulated_store": True, "row_mib": row_mib, "rows": rows, "target_mib": limit,
               "note": "feature maps are random values in the store's format; see the module docstring"}
    atomic_write_json(args.out, payload)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
