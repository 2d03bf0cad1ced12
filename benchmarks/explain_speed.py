"""Images per second: predict vs. explain, per explanation method and backbone.

    python benchmarks/explain_speed.py [--images 4] [--batch-size 4] [--backbones vgg19,densenet121,...]
    python benchmarks/explain_speed.py --methods ig-sequence,occlusion,gradcam --backbones efficientnet_lite0

Every method runs through the same CamExplainer (its hooks, if any, released after each one), so memory
stays flat over many images; --methods all includes the slow references (ig-pixels, pixel-occlusion,
scorecam).

The paper's four backbones run with random weights (``none``: the architecture, not the weights, sets the
cost, and it works offline); efficientnet_lite0 with its shipped ImageNet weights. Each gets the default
LSTM head. Inputs are phantom-like grey images of --image-size px (resized to the backbone's input);
explain includes the map's resize back to that size. Prints a table and writes
benchmarks/results/explain_speed.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from cxrnn.utils.atomic import atomic_write_json
from cxrnn.data.phantom import PhantomConfig, render_case
from cxrnn.explain import CamExplainer
from cxrnn.explain.localisation import parse_methods
from cxrnn.models.backbones import create_backbone
from cxrnn.models.bundle import ModelBundle, build_network
from cxrnn.inference.predictor import Predictor

DEFAULT_BACKBONES = ("vgg19:none", "densenet121:none", "inception_v3:none", "inception_resnet_v2:none",
                     "efficientnet_lite0:imagenet")
RESULTS = Path(__file__).resolve().parent / "results" / "explain_speed.json"


def make_bundle(name: str, weights: str, head: str, classes: list[str]) -> ModelBundle:
    backbone = create_backbone(name, weights, seed=0)
    torch.manual_seed(0)
    net, hw = build_network(backbone, head, len(classes), {})
    net.freeze_backbone().eval()
    return ModelBundle(net, classes, backbone.preprocessing, name, backbone.weights_id, head, {}, hw)


def seconds_per_image(fn, images: list[np.ndarray], repeats: int) -> float:
    fn(images[:1])  # warm-up: first-call allocations and kernel selection
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn(images)
        best = min(best, time.perf_counter() - start)
    return best / len(images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", default=",".join(DEFAULT_BACKBONES),
                        help="comma-separated NAME:WEIGHTS (weights: imagenet, none or a file)")
    parser.add_argument("--images", type=int, default=4, help="images per timing run")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2, help="timing runs per measurement (the best is kept)")
    parser.add_argument("--head", default="lstm")
    parser.add_argument("--methods", default="ig-sequence,occlusion,gradcam",
                        help="comma-separated explanation methods, or 'all'")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    classes = ["covid", "normal", "pneumonia"]
    cfg = PhantomConfig(size=args.image_size)
    images = [render_case(1000 + i, classes[i % 3], cfg).image for i in range(args.images)]
    rows = []
    for item in args.backbones.split(","):
        name, _, weights = item.partition(":")
        bundle = make_bundle(name, weights or "imagenet", args.head, classes)
        predictor = Predictor(bundle, batch_size=args.batch_size)
        predict_s = seconds_per_image(predictor.predict_arrays, images, args.repeats)
        for method in parse_methods(args.methods):
            with CamExplainer(bundle, method=method, batch_size=args.batch_size) as explainer:
                explain_s = seconds_per_image(explainer.explain_arrays, images, args.repeats)
                layer = explainer.layer_name
            rows.append({"backbone": name, "weights": weights or "imagenet", "method": method, "layer": layer,
                         "input_size": bundle.preprocessing.input_size, "predict_s_per_image": predict_s,
                         "explain_s_per_image": explain_s, "explain_images_per_s": 1.0 / explain_s,
                         "ratio": explain_s / predict_s})
            print(f"{name:22s} {method:16s} {layer:16s} predict {1 / predict_s:7.2f} img/s   "
                  f"explain {1 / explain_s:7.2f} img/s   explain/predict time {explain_s / predict_s:6.2f}", flush=True)
        del bundle, predictor

    report = {
        "benchmark": "explain_speed",
        "methods": args.methods,
        "head": args.head,
        "images": args.images,
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "load_average_1min": os.getloadavg()[0]},
        "results": rows,
    }
    atomic_write_json(args.out, report)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
