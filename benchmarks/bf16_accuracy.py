"""Does the bf16 path cost accuracy? The demo's configuration trained and tested twice, fp32 and bf16.

    python benchmarks/bf16_accuracy.py                 # the demo phantom (300 per class), EfficientNet-Lite0
    python benchmarks/bf16_accuracy.py --per-class 100 --epochs 15

Same phantom, split, seed and head for both runs; only ``precision`` differs (bf16 autocast for feature
extraction and head training, and for the saved model's prediction). Also predicts the fp32 model's test
images under bf16 autocast, which isolates inference precision from training. The issue's target: test
accuracy within 0.5 points of fp32. Prints a table and writes benchmarks/results/bf16_accuracy.json.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cxrnn.atomic import atomic_write_json
from cxrnn.data.phantom import generate_phantom
from cxrnn.demo import demo_configs
from cxrnn.predict import Predictor
from cxrnn.training.trainer import train

RESULTS = Path(__file__).resolve().parent / "results"


def _test_paths_and_labels(run_dir: Path) -> tuple[list[str], list[str]]:
    with open(run_dir / "predictions.csv") as fh:
        rows = list(csv.DictReader(fh))
    return [r["path"] for r in rows], [r["label"] for r in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-class", type=int, default=300)
    parser.add_argument("--epochs", type=int, default=None, help="default: the demo's 40")
    parser.add_argument("--work", type=Path, default=None, help="folder for the phantom, runs and cache")
    parser.add_argument("--out", type=Path, default=RESULTS / "bf16_accuracy.json")
    args = parser.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="cxrnn-bf16-"))
    phantom_cfg, base = demo_configs(work)
    phantom_cfg.per_class = args.per_class
    if not (work / "phantom" / "manifest.csv").is_file():
        generate_phantom(work / "phantom", phantom_cfg)
    rows = {}
    for precision in ("fp32", "bf16"):
        cfg = dataclasses.replace(base, precision=precision, out=str(work / precision), bootstrap=0,
                                  cache_dir=str(work / "cache"), epochs=args.epochs or base.epochs)
        t0 = time.perf_counter()
        result = train(cfg)
        rows[precision] = {"accuracy": result.metrics["accuracy"], "macro_f1": result.metrics["macro_f1"],
                           "macro_auc": result.metrics["macro_auc"], "n_test": result.metrics["n"],
                           "run_s": time.perf_counter() - t0}
    # The fp32 model's own test images, predicted under bf16 autocast.
    paths, labels = _test_paths_and_labels(work / "fp32")
    fp32_model = work / "fp32" / "model.pt"
    predictions = {p: Predictor.from_file(fp32_model, precision=p).predict_paths(paths) for p in ("fp32", "bf16")}
    agree = float(np.mean([a.label == b.label for a, b in zip(predictions["fp32"], predictions["bf16"])]))
    acc_bf16_inference = float(np.mean([p.label == y for p, y in zip(predictions["bf16"], labels)]))
    max_prob_diff = max(abs(a.probabilities[c] - b.probabilities[c])
                        for a, b in zip(predictions["fp32"], predictions["bf16"]) for c in a.probabilities)
    result = {
        "machine": {"torch": torch.__version__, "native_bf16": bool(torch.backends.mkldnn.is_available()
                                                                     and torch.ops.mkldnn._is_mkldnn_bf16_supported())},
        "data": {"phantom_per_class": args.per_class, "backbone": base.backbone, "head": base.head},
        "train": rows,
        "accuracy_difference_points": 100 * (rows["bf16"]["accuracy"] - rows["fp32"]["accuracy"]),
        "fp32_model_bf16_inference": {"accuracy": acc_bf16_inference, "label_agreement": agree,
                                      "max_probability_difference": max_prob_diff},
        "target_points": 0.5,
    }
    print(f"{'training':10s} {'accuracy':>9s} {'macro F1':>9s} {'AUC':>7s} {'seconds':>8s}")
    for p, r in rows.items():
        print(f"{p:10s} {r['accuracy']:9.3f} {r['macro_f1']:9.3f} {r['macro_auc']:7.3f} {r['run_s']:8.1f}")
    print(f"bf16 - fp32 test accuracy: {result['accuracy_difference_points']:+.2f} points (target within 0.5)")
    print(f"fp32 model under bf16 inference: accuracy {acc_bf16_inference:.3f}, labels agree {agree:.3f}, "
          f"max probability difference {max_prob_diff:.4f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
