"""Feature store on disk (memmap, fp16, resume), bf16, DataLoader workers, and 2-process torchrun runs.

No timings here: speed and memory are measured by benchmarks/.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cxrnn.data.dataset import load_dataset
from cxrnn.data.phantom import PhantomConfig, generate_phantom
from cxrnn.features.matrix import FeatureRows, open_matrix, take_rows, write_matrix
from cxrnn.features.store import FeatureStore
from cxrnn.models.backbones import create_backbone

TINY = "mobilenetv3_small_050"  # a timm net small enough for 2 processes on 2 cores


@pytest.fixture(scope="module")
def small_phantom(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("perf-phantom")
    generate_phantom(root, PhantomConfig(per_class=8, size=64, seed=5))
    return root


@pytest.fixture(scope="module")
def tiny_backbone():
    return create_backbone(TINY, "none", seed=1)


def _paths(root: Path) -> list[Path]:
    return [s.path for s in load_dataset(root).samples]


def test_matrix_round_trip_and_lazy_rows(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.standard_normal((9, 4, 3, 3)).astype(np.float32)
    for dtype in ("float32", "float16"):
        path = write_matrix(tmp_path / f"m-{dtype}.npy", 9, (4, 3, 3), dtype, iter(data))
        mm = open_matrix(path)
        assert isinstance(mm, np.memmap) and mm.dtype == np.dtype(dtype) and mm.shape == (9, 4, 3, 3)
        expected = data.astype(dtype).astype(np.float32)
        index = [7, 0, 7, 3, -1]
        got = take_rows(mm, index)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, expected[index])
        np.testing.assert_array_equal(take_rows(mm[2:], [0, 1]), expected[[2, 3]])  # a view keeps its offset
        rows = FeatureRows(mm, [5, 1, 8])
        assert len(rows) == 3 and rows.shape == (3, 4, 3, 3)
        np.testing.assert_array_equal(rows[np.array([2, 0])], expected[[8, 5]])
        np.testing.assert_array_equal(np.asarray(rows), expected[[5, 1, 8]])
        assert sum(len(b) for b in rows.batches(2)) == 3
    with pytest.raises(ValueError, match="expected 9"):
        write_matrix(tmp_path / "short.npy", 9, (4, 3, 3), "float32", iter(data[:5]))
    assert not (tmp_path / "short.npy").exists()


def test_store_returns_memmap_and_fp16_matches_fp32(small_phantom, tiny_backbone, tmp_path):
    paths = _paths(small_phantom)
    full = FeatureStore(tiny_backbone, tmp_path, dtype="float32").extract(paths)
    half = FeatureStore(tiny_backbone, tmp_path, dtype="float16").extract(paths)
    assert isinstance(full.features, np.memmap) and full.features.dtype == np.float32
    assert isinstance(half.features, np.memmap) and half.features.dtype == np.float16
    a, b = np.asarray(full.features), np.asarray(half.features, dtype=np.float32)
    assert a.shape == b.shape == (len(paths), *a.shape[1:])
    assert np.abs(a - b).max() <= 1e-2 * max(1.0, np.abs(a).max())
    again = FeatureStore(tiny_backbone, tmp_path, dtype="float32").extract(paths)
    assert again.n_computed == 0 and again.n_cached == len(paths)
    assert again.features.filename == full.features.filename  # the assembled matrix is reused


def test_interrupted_extraction_resumes_without_redoing_finished_maps(small_phantom, tiny_backbone, tmp_path):
    paths = _paths(small_phantom)
    store = FeatureStore(tiny_backbone, tmp_path / "store")
    first = store.extract(paths[: len(paths) // 2])  # the "interrupted" run got this far
    assert first.n_computed == len(paths) // 2
    stamps = {p: p.stat().st_mtime_ns for p in store.directory.glob("*/*.npy")}
    rest = store.extract(paths)
    assert rest.n_cached == len(paths) // 2
    assert rest.n_computed == len(paths) - len(paths) // 2
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())  # finished maps were not rewritten
    one_go = FeatureStore(tiny_backbone, tmp_path / "fresh").extract(paths)
    np.testing.assert_allclose(np.asarray(rest.features), np.asarray(one_go.features), rtol=1e-5, atol=1e-5)


def test_workers_and_decoded_image_cache_give_the_same_features(small_phantom, tiny_backbone, tmp_path):
    paths = _paths(small_phantom)[:9]
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    plain = FeatureStore(tiny_backbone, tmp_path / "a").extract(paths + [bad], batch_size=4, warn=lambda m: None)
    cached = FeatureStore(tiny_backbone, tmp_path / "b", workers=2, image_cache=tmp_path / "images").extract(
        paths + [bad], batch_size=4, warn=lambda m: None)
    assert plain.kept == cached.kept == list(range(len(paths)))
    assert [e.path for e in cached.errors] == [bad]
    assert len(list((tmp_path / "images").glob("*/*.npy"))) == len(paths)
    np.testing.assert_allclose(np.asarray(plain.features), np.asarray(cached.features), rtol=1e-5, atol=1e-5)
    reused = FeatureStore(tiny_backbone, tmp_path / "c", image_cache=tmp_path / "images").extract(paths)
    np.testing.assert_allclose(np.asarray(reused.features), np.asarray(plain.features), rtol=1e-5, atol=1e-5)


def test_bf16_features_are_close_to_fp32_and_stored_apart(small_phantom, tmp_path):
    backbone = create_backbone("efficientnet_lite0", "imagenet")
    paths = _paths(small_phantom)[:6]
    fp32_store = FeatureStore(backbone, tmp_path)
    bf16_store = FeatureStore(backbone, tmp_path, precision="bf16")
    assert fp32_store.directory != bf16_store.directory
    a = np.asarray(fp32_store.extract(paths).features)
    b = np.asarray(bf16_store.extract(paths).features)
    relative = np.linalg.norm(a - b) / np.linalg.norm(a)
    assert 0 < relative < 0.15, relative  # bf16 ran, and keeps ~3 significant digits through ~60 layers
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.99


def test_onnxruntime_extraction_matches_torch_and_exports_once(small_phantom, tmp_path):
    backbone = create_backbone("efficientnet_lite0", "imagenet")
    paths = _paths(small_phantom)
    torch_store = FeatureStore(backbone, tmp_path / "t", runtime="torch")
    onnx_store = FeatureStore(backbone, tmp_path / "o", runtime="onnx")
    assert torch_store.directory.name == onnx_store.directory.name  # same maps, same key
    a = np.asarray(torch_store.extract(paths).features)
    first = onnx_store.extract(paths[:5])
    exported = onnx_store.directory / "backbone.onnx"
    stamp = exported.stat().st_mtime_ns
    b = np.asarray(onnx_store.extract(paths).features)
    assert (torch_store.engine_name, onnx_store.engine_name) == ("torch", "onnx")
    assert first.n_computed == 5 and exported.stat().st_mtime_ns == stamp  # exported once, then reused
    import onnx

    meta = {p.key: json.loads(p.value) for p in onnx.load(str(exported)).metadata_props}
    assert (meta["backbone"], meta["weights"]) == ("efficientnet_lite0", backbone.weights_id)
    assert [p.name for p in onnx_store.directory.iterdir() if p.name.endswith(".tmp")] == []
    assert np.abs(a - b).max() <= 1e-4 * np.abs(a).max()

    auto = FeatureStore(backbone, tmp_path / "a")
    auto.extract(paths[:2])
    assert auto.engine_name == "onnx"  # fp32 on the CPU
    cached = FeatureStore(backbone, tmp_path / "a").extract(paths[:2])
    assert cached.n_computed == 0  # nothing to compute: no engine is built
    with pytest.raises(ValueError, match="fp32 on the CPU"):
        FeatureStore(backbone, tmp_path / "x", runtime="onnx", precision="bf16").extract(paths[:1])
    with pytest.raises(ValueError, match="auto, torch, onnx"):
        FeatureStore(backbone, tmp_path / "x", runtime="tensorrt")


def test_auto_extraction_falls_back_to_torch_when_export_fails(small_phantom, tiny_backbone, tmp_path, monkeypatch):
    import cxrnn.features.extractors as extractors

    def broken_export(*args, **kwargs):
        raise RuntimeError("Unsupported: ONNX export of operator foo\nsecond line")

    monkeypatch.setattr(extractors, "export_onnx", broken_export)
    paths = _paths(small_phantom)[:3]
    warnings: list[str] = []
    store = FeatureStore(tiny_backbone, tmp_path / "auto")
    result = store.extract(paths, warn=warnings.append)
    assert store.engine_name == "torch" and len(result.kept) == 3
    assert warnings == [f"onnxruntime unavailable for {TINY} (Unsupported: ONNX export of operator foo); "
                        "extracting with torch"]
    with pytest.raises(RuntimeError, match="ONNX export of backbone"):
        FeatureStore(tiny_backbone, tmp_path / "explicit", runtime="onnx").extract(paths)


def test_extract_cli_names_the_engine_and_rejects_an_unknown_runtime(small_phantom, tmp_path):
    from typer.testing import CliRunner

    from cxrnn.cli import app

    common = ["extract", "--data", str(small_phantom), "--backbone", TINY, "--weights", "none"]
    def run(*extra: str) -> tuple[int, str]:
        result = CliRunner().invoke(app, [*common, "--cache-dir", str(tmp_path / "c"), *extra])
        return result.exit_code, " ".join(result.output.split())  # rich wraps lines at the terminal width

    code, output = run("--runtime", "torch")
    assert code == 0, output
    assert "24 computed, 0 already stored, 0 unreadable; engine torch" in output
    code, output = run()
    assert code == 0 and "engine none needed" in output  # every map was already stored
    code, output = run("--runtime", "tensorrt")
    assert code != 0 and "auto, torch, onnx" in output


def test_fit_head_reads_lazy_rows_like_an_array(tmp_path):
    from cxrnn.models.heads import create_head
    from cxrnn.training.config import TrainConfig
    from cxrnn.training.loop import fit_head

    rng = np.random.default_rng(1)
    x = rng.standard_normal((40, 8, 2, 2)).astype(np.float32)
    y = rng.integers(0, 3, 40)
    mm = open_matrix(write_matrix(tmp_path / "x.npy", 40, (8, 2, 2), "float32", iter(x)))
    cfg = TrainConfig(epochs=3, batch_size=8, patience=0)
    heads = []
    for train_x, val_x in ((x[:30], x[30:]), (FeatureRows(mm, range(30)), FeatureRows(mm, range(30, 40)))):
        torch.manual_seed(0)
        head = create_head("pool", 8, 4, 3)
        fit = fit_head(head, train_x, y[:30], val_x, y[30:], cfg, seed=0)
        heads.append((head, fit))
    (h1, f1), (h2, f2) = heads
    assert [r["val_loss"] for r in f1.history] == pytest.approx([r["val_loss"] for r in f2.history])
    for p1, p2 in zip(h1.parameters(), h2.parameters()):
        torch.testing.assert_close(p1, p2)


def test_predictor_bf16_close_to_fp32(trained_run, phantom_dir):
    from cxrnn.inference.predictor import Predictor

    files = sorted((phantom_dir / "covid").glob("*.png"))[:4]
    fp32 = Predictor.from_file(trained_run.model_path)
    bf16 = Predictor.from_file(trained_run.model_path, precision="bf16")
    p32 = np.array([list(p.probabilities.values()) for p in fp32.predict_paths(files)])
    p16 = np.array([list(p.probabilities.values()) for p in bf16.predict_paths(files)])
    assert p32.shape == p16.shape == (4, 3)
    assert np.abs(p32 - p16).max() < 0.1
    assert np.abs(p32 - p16).max() > 1e-6  # bf16 really ran: autocast changes the numbers
    np.testing.assert_array_equal(p32.argmax(1), p16.argmax(1))


def test_cuda_without_a_usable_gpu_is_a_clear_error_before_any_work(trained_run, monkeypatch, tmp_path):
    from cxrnn.inference.device import resolve_device
    from cxrnn.inference.predictor import Predictor

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name in ("cuda", "cuda:1", " CUDA "):
        with pytest.raises(ValueError, match="no CUDA GPU is available to this PyTorch build; use --device cpu"):
            resolve_device(name)
    with pytest.raises(ValueError, match="no CUDA GPU"):
        Predictor.from_file(trained_run.model_path, device="cuda")
    with pytest.raises(ValueError, match="no CUDA GPU"):
        FeatureStore(create_backbone(TINY, "none"), tmp_path, device="cuda")
    with pytest.raises(ValueError, match="device must be cpu or cuda"):
        resolve_device("tpu")
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16, not 'fp16'"):
        Predictor.from_file(trained_run.model_path, precision="fp16")
    assert resolve_device(None) == resolve_device(" CPU ") == torch.device("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_predictor_on_cuda_matches_the_cpu(trained_run, phantom_dir):
    from cxrnn.inference.predictor import Predictor

    files = sorted((phantom_dir / "normal").glob("*.png"))[:4]
    cpu = Predictor.from_file(trained_run.model_path).predict_paths(files)
    gpu_predictor = Predictor.from_file(trained_run.model_path, device="cuda")
    assert next(gpu_predictor.bundle.net.parameters()).device.type == "cuda"
    gpu = gpu_predictor.predict_paths(files)
    for a, b in zip(cpu, gpu):
        assert a.label == b.label
        np.testing.assert_allclose(list(b.probabilities.values()), list(a.probabilities.values()), atol=1e-3)
        assert b.ood["score"] == pytest.approx(a.ood["score"], rel=1e-2)


def _torchrun(args: list[str], cwd: Path, nproc: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--master-port", str(_free_port()), "-m", "cxrnn", *args]
    else:
        cmd = [sys.executable, "-m", "cxrnn", *args]
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_give_the_same_features_and_finetuned_model(tmp_path):
    from cxrnn.data.splits import train_val_test_split

    data = tmp_path / "data"
    # a training split that divides evenly by the global batch: the DistributedSampler needs no padding
    # and both layouts see identical batches, so they must end with the same weights
    for per_class in range(12, 24):
        generate_phantom(data, PhantomConfig(per_class=per_class, size=64, seed=7))
        split = train_val_test_split(load_dataset(data).labels(), 0.2, 0.1, 0, None)
        if len(split.train) % 8 == 0:
            break
        shutil.rmtree(data)
    else:  # pragma: no cover
        pytest.skip("no phantom size with an even training split")
    common = ["--backbone", TINY, "--weights", "none"]
    _torchrun(["extract", "--data", str(data), "--cache-dir", str(tmp_path / "c2"), *common], tmp_path, 2)
    m2 = np.load(next((tmp_path / "c2").glob("*/matrices/*.npy")))
    one = FeatureStore(create_backbone(TINY, "none", seed=0), tmp_path / "c1").extract(_paths(data))
    m1 = np.asarray(one.features)
    np.testing.assert_allclose(m2, m1, rtol=1e-4, atol=1e-5)

    (tmp_path / "ft.yaml").write_text("head_options: {dropout: 0.0}\n")
    train = ["train", "--data", str(data), "--finetune", "--epochs", "2", "--head", "pool", "--batch-size", "8",
             "--config", str(tmp_path / "ft.yaml"), "--no-dedup", "--bootstrap", "0", *common]
    _torchrun([*train, "--out", str(tmp_path / "run2")], tmp_path, 2)
    from typer.testing import CliRunner

    from cxrnn.cli import app

    single = CliRunner().invoke(app, [*train, "--out", str(tmp_path / "run1")])  # one process, in this one
    assert single.exit_code == 0, single.output
    met1 = json.loads((tmp_path / "run1" / "metrics.json").read_text())
    met2 = json.loads((tmp_path / "run2" / "metrics.json").read_text())
    assert met1["accuracy"] == pytest.approx(met2["accuracy"])
    assert met1["macro_auc"] == pytest.approx(met2["macro_auc"], abs=0.02)
    s1 = torch.load(tmp_path / "run1" / "model.pt", weights_only=True)["state_dict"]
    s2 = torch.load(tmp_path / "run2" / "model.pt", weights_only=True)["state_dict"]
    worst = max((s1[k].float() - s2[k].float()).abs().max().item() for k in s1)
    assert worst < 1e-3, worst
