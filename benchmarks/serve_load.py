"""Load test of ``cxrnn serve`` on loopback: N concurrent clients for a bounded time, with and without micro-batching.

    python benchmarks/serve_load.py MODEL [--clients 8] [--seconds 15] [--image PATH]

For each setting a fresh server (uvicorn, 127.0.0.1 only, free port) is started in a subprocess; clients
post the same image to /v1/predict as fast as they get answers. Prints a table and writes
benchmarks/results/serve_load.json (latency p50/p95, throughput, errors, the server's batch sizes).
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np

from cxrnn.utils.atomic import atomic_write_json

HOST = "127.0.0.1"  # loopback only: this benchmark never sends traffic anywhere else


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def start_server(model: str, port: int, batch: int, batch_ms: float, runtime: str) -> subprocess.Popen:
    cmd = [sys.executable, "-c", "from cxrnn.cli import app; app()", "serve", model, "--host", HOST,
           "--port", str(port), "--batch", str(batch), "--batch-ms", str(batch_ms), "--runtime", runtime]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"http://{HOST}:{port}/healthz", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise SystemExit("server did not start within 180 s")


def run_clients(url: str, image: bytes, name: str, clients: int, seconds: float) -> dict:
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    errors = 0
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def client() -> None:
        nonlocal errors
        with httpx.Client(timeout=120) as http:
            while time.monotonic() < stop_at:
                t0 = time.perf_counter()
                try:
                    r = http.post(url + "/v1/predict", files={"file": (name, image)})
                    status = r.status_code
                except httpx.HTTPError:
                    status = -1
                dt = time.perf_counter() - t0
                with lock:
                    statuses[status] = statuses.get(status, 0) + 1
                    if status == 200:
                        latencies.append(dt)
                    else:
                        errors += 1

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    lat = np.array(latencies) * 1000
    return {"requests_ok": len(latencies), "errors": errors, "statuses": {str(k): v for k, v in statuses.items()},
            "seconds": elapsed, "throughput_rps": len(latencies) / elapsed,
            "latency_ms": {"p50": float(np.percentile(lat, 50)) if len(lat) else None,
                           "p95": float(np.percentile(lat, 95)) if len(lat) else None,
                           "mean": float(lat.mean()) if len(lat) else None}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--image", default=None, help="image to post (default: the reference DICOM's pixels as PNG)")
    parser.add_argument("--batch", type=int, default=8, help="micro-batch size of the batched setting")
    parser.add_argument("--batch-ms", type=float, default=10.0)
    parser.add_argument("--runtime", default="torch")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "serve_load.json"))
    args = parser.parse_args()

    if args.image:
        image, name = Path(args.image).read_bytes(), Path(args.image).name
    else:
        import io

        from PIL import Image

        from cxrnn.data.io import read_image, reference_radiograph

        grey = read_image(reference_radiograph())
        buf = io.BytesIO()
        Image.fromarray((grey * 255).astype(np.uint8)).resize((1024, 1024)).save(buf, format="PNG")
        image, name = buf.getvalue(), "rg1_1024.png"

    settings = [("no batching", 1, 0.0), (f"micro-batching (<= {args.batch} within {args.batch_ms:g} ms)",
                                          args.batch, args.batch_ms)]
    rows = []
    for label, batch, batch_ms in settings:
        port = free_port()
        proc = start_server(args.model, port, batch, batch_ms, args.runtime)
        try:
            url = f"http://{HOST}:{port}"
            httpx.post(url + "/v1/predict", files={"file": (name, image)}, timeout=120)  # warm-up
            result = run_clients(url, image, name, args.clients, args.seconds)
            result["server_batches"] = httpx.get(url + "/healthz").json()["batching"]
        finally:
            proc.terminate()
            proc.wait(30)
        rows.append({"setting": label, "batch": batch, "batch_ms": batch_ms, **result})

    print(f"{'setting':<42} {'ok':>6} {'err':>5} {'req/s':>7} {'p50 ms':>8} {'p95 ms':>8} {'mean batch':>10}")
    for r in rows:
        print(f"{r['setting']:<42} {r['requests_ok']:>6} {r['errors']:>5} {r['throughput_rps']:>7.2f} "
              f"{r['latency_ms']['p50'] or float('nan'):>8.0f} {r['latency_ms']['p95'] or float('nan'):>8.0f} "
              f"{r['server_batches']['mean_batch']:>10.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"model": args.model, "clients": args.clients, "seconds_per_setting": args.seconds,
               "image": name, "image_bytes": len(image), "runtime": args.runtime,
               "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                           "python": platform.python_version(),
                           # other work on the machine skews every number: recorded so runs can be compared
                           "load_average_1m_at_end": os.getloadavg()[0]}, "results": rows}
    atomic_write_json(out, payload)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
