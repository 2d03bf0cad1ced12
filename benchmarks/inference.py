"""Backbone throughput against the machine's own matmul peak, API overhead, start-up and decoding cost.

    python benchmarks/inference.py            # the five backbones, batch 1 and 16, four modes
    python benchmarks/inference.py --quick    # efficientnet_lite0 and vgg19 only

Prints tables and writes benchmarks/results/inference.json:
{"machine": {"cpu", "threads", "matmul_gflops_fp32", "matmul_gflops_bf16", ...},
 "rows": [{"backbone", "batch", "mode", "images_per_s", "ms_per_image", "gflop_per_image", "share_of_peak"}],
 "api": [{"model", "image", "predict_one_ms", "model_forward_ms", "ratio_to_forward"}], "startup": {...}, "decode": [...]}

Modes: fp32 (NCHW), fp32_channels_last (cxrnn's torch engine), bf16 (autocast, channels_last: cxrnn's bf16
path) and onnxruntime (cxrnn.features.extractors.onnx_extractor: the engine `cxrnn extract`/`train` pick for fp32 on
the CPU). FLOPs are counted by torch's FlopCounterMode
(a multiply-add is 2 FLOPs). Paper backbones use --weights none here: speed does not depend on the values.
The load average is recorded because other processes on the machine slow every number down; on an
oversubscribed machine use --threads 1: OpenMP barriers between descheduled threads cost a scheduler
time slice each (EfficientNet-Lite0 measured 27x slower with 2 threads than 1 at load average 15).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cxrnn.inference import device
from cxrnn.utils.atomic import atomic_write_json
from cxrnn.models.backbones import create_backbone

BACKBONES = ["efficientnet_lite0", "vgg19", "densenet121", "inception_v3", "inception_resnet_v2"]
MODES = ["fp32", "fp32_channels_last", "bf16", "onnxruntime"]
RESULTS = Path(__file__).resolve().parent / "results"


def matmul_gflops(dtype: torch.dtype, n: int = 2048, seconds: float = 2.0) -> float:
    """Best observed rate of an n x n matmul: the machine's practical peak for that precision."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(2):
        a @ b
    best, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def gflop_per_image(module: torch.nn.Module, size: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        module(torch.zeros(1, 3, size, size))
    return counter.get_total_flops() / 1e9


def time_call(fn, min_reps: int, max_seconds: float) -> float:
    """Seconds per call: one warm-up, then at least ``min_reps`` calls or ``max_seconds``; the median."""
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - start < max_seconds and len(times) < 50):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
        if time.perf_counter() - start > max_seconds and len(times) >= 1:
            break
    return float(np.median(times))


def onnx_runner(backbone, threads: int):
    """cxrnn's own ONNX Runtime extraction engine (what ``cxrnn extract`` uses for fp32 on the CPU)."""
    from cxrnn.features.extractors import onnx_extractor

    tmp = tempfile.TemporaryDirectory(prefix="cxrnn-bench-")
    return onnx_extractor(backbone, Path(tmp.name) / "backbone.onnx", threads=threads), tmp


def bench_backbone(name: str, batches: list[int], modes: list[str], peak: dict[str, float], reps: int,
                   max_seconds: float) -> list[dict]:
    weights = "imagenet" if name == "efficientnet_lite0" else "none"
    backbone = create_backbone(name, weights).eval()
    size = backbone.preprocessing.input_size
    gflop = gflop_per_image(backbone, size)
    rows = []
    for mode in modes:
        extractor = tmp = None
        if mode == "onnxruntime":
            backbone = backbone.to(memory_format=torch.contiguous_format)
            extractor, tmp = onnx_runner(backbone, torch.get_num_threads())
        elif mode == "fp32":
            backbone = backbone.to(memory_format=torch.contiguous_format)
        else:
            backbone = device.prepare_module(backbone, "cpu")
        for batch in batches:
            x = torch.randn(batch, 3, size, size)
            if mode == "onnxruntime":
                fn = lambda: extractor(x)  # noqa: E731
            elif mode == "fp32":
                fn = lambda: _forward(backbone, x, "fp32")  # noqa: E731
            else:
                xc = x.contiguous(memory_format=torch.channels_last)
                precision = "bf16" if mode == "bf16" else "fp32"
                fn = lambda: _forward(backbone, xc, precision)  # noqa: E731
            seconds = time_call(fn, reps, max_seconds)
            ips = batch / seconds
            rate = peak["bf16"] if mode == "bf16" else peak["fp32"]
            rows.append({"backbone": name, "batch": batch, "mode": mode, "images_per_s": ips,
                         "ms_per_image": 1000 * seconds / batch, "gflop_per_image": gflop,
                         "share_of_peak": ips * gflop / rate})
            print(f"  {name:20s} b{batch:<3d} {mode:19s} {ips:8.2f} img/s {1000 * seconds / batch:9.1f} ms/img "
                  f"{ips * gflop / rate:6.1%} of peak", flush=True)
        if tmp is not None:
            tmp.cleanup()
    return rows


def _forward(module: torch.nn.Module, x: torch.Tensor, precision: str) -> torch.Tensor:
    with torch.inference_mode(), device.autocast("cpu", precision):
        return module(x)


API_MODELS = [("efficientnet_lite0", "imagenet"), ("vgg19", "none")]


def _api_images(tmp: Path) -> dict[str, Path]:
    from PIL import Image

    rng = np.random.default_rng(0)
    images = {"1024x1024 16-bit PNG": tmp / "xray16.png", "256x256 8-bit PNG": tmp / "xray8.png"}
    # Noise barely compresses; the real radiograph saved as a 1024 px 16-bit PNG decoded no faster (16-25 ms).
    Image.fromarray((rng.random((1024, 1024)) * 65535).astype(np.uint16)).save(images["1024x1024 16-bit PNG"])
    Image.fromarray((rng.random((256, 256)) * 255).astype(np.uint8)).save(images["256x256 8-bit PNG"])
    try:  # the one real chest radiograph offline: 1841x1955, 15-bit, MONOCHROME1
        from cxrnn.data.io import reference_radiograph

        images["DICOM RG1_UNCR (real radiograph)"] = reference_radiograph("RG1_UNCR.dcm")
    except Exception as exc:  # pydicom-data missing: report, do not fail the benchmark
        print(f"  (no RG1_UNCR.dcm: {exc})")
    return images


def bench_api(reps: int, max_seconds: float) -> dict:
    """One image through Predictor (decode + preprocess + model + softmax) vs the bare model forward,
    for a cheap and an expensive backbone and a large and a small file; and ``cxrnn predict`` start-up."""
    from cxrnn.data.io import read_image
    from cxrnn.models.bundle import ModelBundle, build_network, save_bundle
    from cxrnn.models.preprocess import to_input_tensor
    from cxrnn.inference.predictor import Predictor

    tmp = Path(tempfile.mkdtemp(prefix="cxrnn-bench-api-"))
    images = _api_images(tmp)
    rows, startup_model = [], None
    for name, weights in API_MODELS:
        backbone = create_backbone(name, weights)
        net, hw = build_network(backbone, "lstm", 3, {})
        bundle = ModelBundle(net=net, classes=["covid", "normal", "pneumonia"], preprocessing=backbone.preprocessing,
                             backbone_name=name, weights_id=backbone.weights_id, head_name="lstm",
                             head_options={}, feature_hw=hw)
        model_path = save_bundle(bundle, tmp / f"{name}.pt")
        startup_model = startup_model or model_path
        predictor = Predictor.from_file(model_path, batch_size=1)
        module = device.prepare_module(predictor.bundle.net.eval(), "cpu")
        for label, image_path in images.items():
            api_s = time_call(lambda: predictor.predict_paths([image_path]), reps, max_seconds)
            x = to_input_tensor([read_image(image_path)], predictor.bundle.preprocessing)
            xc = x.contiguous(memory_format=torch.channels_last)
            forward_s = time_call(lambda: _forward(module, xc, "fp32"), reps, max_seconds)
            rows.append({"model": f"{name}+lstm", "image": label, "predict_one_ms": 1000 * api_s,
                         "model_forward_ms": 1000 * forward_s, "ratio_to_forward": api_s / forward_s})

    image_path = images["1024x1024 16-bit PNG"]
    one_s = next(r["predict_one_ms"] for r in rows if r["image"] == "1024x1024 16-bit PNG") / 1000
    cli = [sys.executable, "-m", "cxrnn"]
    help_s = _wall([*cli, "--help"])
    predict_s = _wall([*cli, "predict", str(startup_model), str(image_path), "--json"])
    import_s = _wall([sys.executable, "-c", "import cxrnn.cli"])
    return {
        "api": rows,
        "startup": {"cxrnn_help_s": help_s, "import_cxrnn_cli_s": import_s,
                    "cxrnn_predict_one_image_s": predict_s,
                    "predict_startup_s": predict_s - one_s,
                    "note": "predict_startup_s = whole `cxrnn predict` run (efficientnet_lite0 model, "
                            "16-bit PNG) minus one in-process prediction"},
    }


def _wall(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - start


def bench_decode(model_ms: dict[str, float], reps: int) -> list[dict]:
    """Decode + preprocess per image for typical files, next to each backbone's forward time per image."""
    from PIL import Image

    from cxrnn.data.io import read_image, reference_radiograph
    from cxrnn.models.backbones import get_spec
    from cxrnn.models.preprocess import to_input_tensor

    tmp = Path(tempfile.mkdtemp(prefix="cxrnn-bench-decode-"))
    rng = np.random.default_rng(0)
    files = {}
    Image.fromarray((rng.random((256, 256)) * 255).astype(np.uint8)).save(tmp / "phantom256.png")
    files["PNG 8-bit 256 px"] = tmp / "phantom256.png"
    Image.fromarray((rng.random((2048, 2048)) * 65535).astype(np.uint16)).save(tmp / "big.png")
    files["PNG 16-bit 2048 px"] = tmp / "big.png"
    Image.fromarray((rng.random((1024, 1024)) * 255).astype(np.uint8)).save(tmp / "x.jpg", quality=90)
    files["JPEG 1024 px"] = tmp / "x.jpg"
    for name in ("RG1_UNCR.dcm", "RG1_J2KR.dcm"):
        try:
            files[f"DICOM {name}"] = reference_radiograph(name)
        except Exception as exc:  # pydicom-data missing: report, do not fail the benchmark
            print(f"  (no {name}: {exc})")
    prep = get_spec("efficientnet_lite0").preprocessing
    rows = []
    for label, path in files.items():
        seconds = time_call(lambda: to_input_tensor([read_image(path)], prep), reps, 5.0)
        rows.append({"file": label, "decode_preprocess_ms": 1000 * seconds,
                     **{f"{k}_forward_ms": v for k, v in model_ms.items()}})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", nargs="+", default=None)
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--modes", nargs="+", default=MODES, choices=MODES)
    parser.add_argument("--reps", type=int, default=2, help="timed calls per setting (after one warm-up)")
    parser.add_argument("--max-seconds", type=float, default=8.0, help="stop repeating a setting after this")
    parser.add_argument("--quick", action="store_true", help="efficientnet_lite0 and vgg19 only")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch/onnxruntime threads (default: torch's choice, one per core)")
    parser.add_argument("--out", type=Path, default=RESULTS / "inference.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    backbones = args.backbones or (["efficientnet_lite0", "vgg19"] if args.quick else BACKBONES)

    machine = {"cpu": device.cpu_name(), "threads": torch.get_num_threads(),
               "cpu_capability": torch.backends.cpu.get_cpu_capability(),
               "native_bf16": device.cpu_supports_bf16(), "torch": torch.__version__,
               "load_average_start": os.getloadavg()[0]}
    machine["matmul_gflops_fp32"] = matmul_gflops(torch.float32)
    machine["matmul_gflops_bf16"] = matmul_gflops(torch.bfloat16)
    print(f"{machine['cpu']}, {machine['threads']} threads, native bf16: {machine['native_bf16']}; matmul "
          f"{machine['matmul_gflops_fp32']:.1f} GFLOP/s fp32, {machine['matmul_gflops_bf16']:.1f} bf16; "
          f"load average {machine['load_average_start']:.1f}", flush=True)
    peak = {"fp32": machine["matmul_gflops_fp32"], "bf16": machine["matmul_gflops_bf16"]}
    # Predictor first: measured after five backbones and their ONNX sessions had run in this process,
    # one 16-bit PNG took 94 ms instead of the 53 ms it takes in a process that only predicts.
    extra = bench_api(max(args.reps, 10), args.max_seconds)  # single calls spike 2-6x now and then: take 10
    rows = []
    for name in backbones:
        rows += bench_backbone(name, args.batches, args.modes, peak, args.reps, args.max_seconds)
    model_ms = {r["backbone"]: r["ms_per_image"] for r in rows if r["mode"] == "fp32_channels_last"
                and r["batch"] == max(args.batches)}
    decode = bench_decode(model_ms, max(args.reps, 3))
    machine["load_average_end"] = os.getloadavg()[0]

    print("\nbackbone             batch mode                img/s   ms/img  GFLOP/img  share of peak")
    for r in rows:
        print(f"{r['backbone']:20s} {r['batch']:5d} {r['mode']:19s} {r['images_per_s']:7.2f} "
              f"{r['ms_per_image']:8.1f} {r['gflop_per_image']:9.2f} {r['share_of_peak']:8.1%}")
    by = {(r["backbone"], r["batch"], r["mode"]): r for r in rows}
    for b in args.batches:
        fp32, bf16 = by.get(("vgg19", b, "fp32_channels_last")), by.get(("vgg19", b, "bf16"))
        plain = by.get(("vgg19", b, "fp32"))
        if fp32 and bf16 and plain:
            print(f"vgg19 batch {b}: fp32 {plain['share_of_peak']:.0%} / channels_last "
                  f"{fp32['share_of_peak']:.0%} of the fp32 matmul rate; bf16 "
                  f"{bf16['images_per_s'] / fp32['images_per_s']:.2f}x channels_last fp32, "
                  f"{bf16['images_per_s'] / plain['images_per_s']:.2f}x plain fp32")
        ort = by.get(("vgg19", b, "onnxruntime"))
        if ort and bf16:
            print(f"vgg19 batch {b}: onnxruntime (cxrnn's default fp32 extraction) {ort['share_of_peak']:.0%} of the "
                  f"fp32 matmul rate; bf16 {bf16['images_per_s'] / ort['images_per_s']:.2f}x onnxruntime fp32")
    print("\none image through Predictor (decode + preprocess + model) vs the model's forward:")
    for api in extra["api"]:
        print(f"  {api['model']:26s} {api['image']:32s} {api['predict_one_ms']:8.1f} ms vs {api['model_forward_ms']:8.1f} ms "
              f"= {api['ratio_to_forward']:.2f}x")
    st = extra["startup"]
    print(f"start-up: `cxrnn --help` {st['cxrnn_help_s']:.2f} s, import cxrnn.cli {st['import_cxrnn_cli_s']:.2f} s, "
          f"`cxrnn predict` one image {st['cxrnn_predict_one_image_s']:.2f} s (start-up ~{st['predict_startup_s']:.2f} s)")
    print("\nfile                     decode+preprocess ms   " + "  ".join(f"{k} fwd ms" for k in model_ms))
    for d in decode:
        print(f"{d['file']:24s} {d['decode_preprocess_ms']:10.1f}            "
              + "  ".join(f"{d[f'{k}_forward_ms']:8.1f}" for k in model_ms))
    payload = {"machine": machine, "rows": rows, **extra, "decode": decode}
    atomic_write_json(args.out, payload)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
