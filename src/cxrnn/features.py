"""Extract frozen-backbone features once and keep them in an on-disk store keyed by content.

The key of a stored map is (backbone architecture, weights identity, preprocessing, image bytes), so
every run, head and fold that uses the same backbone on the same files reuses the same maps, and a file
that changed on disk is extracted again. Each map is written to a temp file and renamed, so an
interrupted extraction resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from cxrnn.data.io import ImageReadError, read_image
from cxrnn.models.backbones import Backbone
from cxrnn.models.preprocess import to_input_tensor

STORE_VERSION = 1
Progress = Callable[[int, int], None]


def default_cache_dir() -> Path:
    env = os.environ.get("CXRNN_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache"))
    return Path(base) / "cxrnn" / "features"


def file_digest(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class FeatureSet:
    """Feature maps (N, C, H, W) for the files that could be read, in input order."""

    features: np.ndarray
    kept: list[int]  # indices into the requested paths
    errors: list[ImageReadError] = field(default_factory=list)
    n_cached: int = 0
    n_computed: int = 0


class FeatureStore:
    def __init__(self, backbone: Backbone, root: str | Path | None = None, dtype: str = "float32"):
        if dtype not in ("float32", "float16"):
            raise ValueError(f"feature dtype must be float32 or float16, not {dtype!r}")
        self.backbone = backbone
        self.dtype = dtype
        identity = {
            "store_version": STORE_VERSION,
            "architecture": backbone.spec.timm_name,
            "weights": backbone.weights_id,
            "preprocessing": backbone.preprocessing.to_dict(),
            "dtype": dtype,
        }
        self.key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
        self.root = Path(root) if root is not None else default_cache_dir()
        self.directory = self.root / f"{backbone.spec.name}-{self.key}"
        self.directory.mkdir(parents=True, exist_ok=True)
        info = self.directory / "store.json"
        if not info.exists():
            _atomic_write_bytes(info, json.dumps(identity, indent=2).encode())

    def path_for(self, digest: str) -> Path:
        return self.directory / digest[:2] / f"{digest}.npy"

    def extract(
        self,
        paths: Sequence[str | Path],
        batch_size: int = 16,
        progress: Progress | None = None,
        strict: bool = False,
        warn: Callable[[str], None] | None = None,
    ) -> FeatureSet:
        """Features for every readable file; unreadable ones are skipped with one warning each."""
        warn = warn or (lambda msg: print(msg, file=sys.stderr))
        digests: list[str | None] = []
        errors: list[ImageReadError] = []
        for p in paths:
            try:
                digests.append(file_digest(p))
            except OSError as exc:
                err = ImageReadError(Path(p), _os_reason(exc))
                if strict:
                    raise err from exc
                warn(f"skipped {err}")
                errors.append(err)
                digests.append(None)
        todo = [i for i, d in enumerate(digests) if d is not None and not self.path_for(d).exists()]
        n_cached = sum(1 for d in digests if d is not None) - len(todo)
        total = len(todo)
        done = n_computed = 0
        if progress:
            progress(0, total)
        self.backbone.eval()
        for start in range(0, total, batch_size):
            chunk = todo[start : start + batch_size]
            images, ok = [], []
            for i in chunk:
                try:
                    images.append(read_image(paths[i]))
                    ok.append(i)
                except ImageReadError as err:
                    if strict:
                        raise
                    warn(f"skipped {err}")
                    errors.append(err)
                    digests[i] = None
            if images:
                with torch.inference_mode():
                    maps = self.backbone(to_input_tensor(images, self.backbone.preprocessing))
                for i, fmap in zip(ok, maps.numpy()):
                    self._write(digests[i], fmap)  # type: ignore[arg-type]
                n_computed += len(ok)
            done += len(chunk)
            if progress:
                progress(done, total)
        kept = [i for i, d in enumerate(digests) if d is not None]
        stacked = self.load([digests[i] for i in kept])  # type: ignore[misc]
        return FeatureSet(stacked, kept, errors, n_cached=n_cached, n_computed=n_computed)

    def load(self, digests: Sequence[str]) -> np.ndarray:
        if not digests:
            return np.zeros((0,), dtype=np.float32)
        first = np.load(self.path_for(digests[0]), mmap_mode="r")
        out = np.empty((len(digests), *first.shape), dtype=np.float32)
        for row, digest in enumerate(digests):
            out[row] = np.load(self.path_for(digest), mmap_mode="r")
        return out

    def _write(self, digest: str, fmap: np.ndarray) -> None:
        target = self.path_for(digest)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                np.save(fh, fmap.astype(self.dtype, copy=False))
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


def _os_reason(exc: OSError) -> str:
    if isinstance(exc, FileNotFoundError):
        return "file not found"
    if isinstance(exc, IsADirectoryError):
        return "is a directory, not an image file"
    return f"cannot read file ({exc.strerror or exc})"


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)
