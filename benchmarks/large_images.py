"""Peak memory and time of `cxrnn predict` and `cxrnn explain` on one image, by image size.

    python benchmarks/large_images.py [--sides 1000,4000,9000] [--model run/model.pt]

Each side S makes an S x S 8-bit PNG (smooth bands, so a 9000 x 9000 file is under 2 MB, like the
hostile file in issue 13) and runs both commands on it in a fresh process; the child's own peak RSS comes
from wait4's rusage. Without --model an untrained EfficientNet-Lite0 + LSTM model (shipped ImageNet
weights) is saved first: the sizes, not the weights, set the cost. Explanations keep their map at the
image's size up to cxrnn.explain.cam.MAP_MAX_PIXELS and draw overlays at most DISPLAY_MAX_SIDE wide, so
explain should cost about what predict costs (decoding dominates). Writes benchmarks/results/large_images.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from cxrnn.utils.atomic import atomic_write_json

RESULTS = Path(__file__).resolve().parent / "results" / "large_images.json"


def make_model(path: Path) -> Path:
    import torch

    from cxrnn.models.backbones import create_backbone
    from cxrnn.models.bundle import ModelBundle, build_network, save_bundle

    classes = ["covid", "normal", "pneumonia"]
    backbone = create_backbone("efficientnet_lite0", "imagenet", seed=0)
    torch.manual_seed(0)
    net, hw = build_network(backbone, "lstm", len(classes), {})
    net.freeze_backbone().eval()
    return save_bundle(ModelBundle(net, classes, backbone.preprocessing, "efficientnet_lite0", backbone.weights_id,
                                   "lstm", {}, hw), path)


def make_image(side: int, path: Path) -> Path:
    from PIL import Image

    x = np.arange(side, dtype=np.float32)
    row = np.sin(x / (side / 13)) + 1.0
    col = np.cos(x / (side / 9)) + 1.0
    Image.fromarray(((row[None, :] + col[:, None]) * 63).astype(np.uint8)).save(path, optimize=True)
    return path


def run_child(args: list[str]) -> dict[str, float]:
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "cxrnn", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    stderr = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"cxrnn {' '.join(args)} failed ({proc.returncode}): {stderr.strip()[-500:]}")
    return {"seconds": round(seconds, 2), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sides", default="1000,4000,9000", help="comma-separated image sides in pixels")
    parser.add_argument("--model", type=Path, help="a cxrnn model.pt (default: an untrained one made here)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    sides = [int(s) for s in args.sides.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        model = args.model or make_model(tmp / "model.pt")
        for side in sides:
            image = make_image(side, tmp / f"side{side}.png")
            predict = run_child(["predict", str(model), str(image), "--json"])
            explain = run_child(["explain", str(model), str(image), "--out", str(tmp / f"maps{side}")])
            rows.append({"side": side, "pixels": side * side, "file_bytes": image.stat().st_size,
                         "predict": predict, "explain": explain,
                         "explain_over_predict_rss": round(explain["peak_rss_mb"] / predict["peak_rss_mb"], 2)})
    print(f"{'image':>13} {'file':>9} {'predict MB':>11} {'s':>6} {'explain MB':>11} {'s':>6} {'ratio':>6}")
    for r in rows:
        print(f"{r['side']:>6} x {r['side']:<6}{r['file_bytes'] / 1e6:>7.1f}MB {r['predict']['peak_rss_mb']:>11.0f} "
              f"{r['predict']['seconds']:>6.1f} {r['explain']['peak_rss_mb']:>11.0f} {r['explain']['seconds']:>6.1f} "
              f"{r['explain_over_predict_rss']:>6.2f}")
    atomic_write_json(args.out, {"machine": platform.platform(), "cpus": os.cpu_count(), "rows": rows})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
