"""Extract frozen-backbone features once and keep them in an on-disk store keyed by content.

The key of a stored map is (backbone architecture, weights identity, preprocessing, image bytes), so
every run, head and fold that uses the same backbone on the same files reuses the same maps, and a file
that changed on disk is extracted again. Each map is written to a temp file and renamed, so an
interrupted extraction resumes where it stopped (only the missing maps are computed).

Training does not stack the maps in RAM: ``extract`` assembles them once into one on-disk matrix per
ordered list of images (``cxrnn.features.matrix``) and returns it memory-mapped. Under torchrun each
process extracts its share of the missing maps and rank 0 assembles the matrix.

The backbone runs on ONNX Runtime or PyTorch (``cxrnn.features.extractors``; ``auto`` picks the faster one).
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from cxrnn.utils import distributed
from cxrnn.utils.atomic import atomic_write, atomic_write_bytes
from cxrnn.data.errors import READER_VERSION
from cxrnn.data.io import ImageReadError
from cxrnn.utils.cache import default_cache_dir
from cxrnn.features.extractors import check_extract_runtime, make_extractor
from cxrnn.features.matrix import matrix_key, open_matrix, write_matrix
from cxrnn.models.backbones import Backbone
from cxrnn.models.preprocess import input_transform, to_input_tensor
from cxrnn.data.loading import DecodedImageCache, ImageFiles, SideComputation, digest_files, image_loader
from cxrnn.inference.device import check_precision, resolve_device

STORE_VERSION = 1
Progress = Callable[[int, int], None]


@dataclass
class FeatureSet:
    """Feature maps (N, C, H, W) for the files that could be read, in input order."""

    features: np.ndarray
    kept: list[int]  # indices into the requested paths
    errors: list[ImageReadError] = field(default_factory=list)
    n_cached: int = 0
    n_computed: int = 0
    digests: list[str | None] = field(default_factory=list)  # per requested path; None: unreadable
    side: dict[int, Any] = field(default_factory=dict)  # path index -> side computation, where it ran


class FeatureStore:
    def __init__(self, backbone: Backbone, root: str | Path | None = None, dtype: str = "float32",
                 precision: str = "fp32", device: str = "cpu", workers: int = 0,
                 image_cache: str | Path | None = None, runtime: str = "auto"):
        if dtype not in ("float32", "float16"):
            raise ValueError(f"feature dtype must be float32 or float16, not {dtype!r}")
        self.backbone = backbone
        self.dtype = dtype
        self.precision = check_precision(precision)
        self.device = resolve_device(device)
        self.workers = workers
        self.image_cache = image_cache
        self.runtime = check_extract_runtime(runtime)
        self.engine_name: str | None = None  # the engine the last extraction ran on
        identity = {
            "store_version": STORE_VERSION,
            "architecture": backbone.spec.timm_name,
            "weights": backbone.weights_id,
            "preprocessing": backbone.preprocessing.to_dict(),
            "dtype": dtype,
        }
        if precision != "fp32":  # bf16 maps differ from fp32 ones; fp32 keys stay as they were
            identity["precision"] = precision
        if READER_VERSION > 1:  # files an older reader accepted may be refused now
            identity["reader"] = READER_VERSION
        self.key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
        self.root = Path(root) if root is not None else default_cache_dir()
        self.directory = self.root / f"{backbone.spec.name}-{self.key}"
        self.directory.mkdir(parents=True, exist_ok=True)
        info = self.directory / "store.json"
        if not info.exists():
            atomic_write_bytes(info, json.dumps(identity, indent=2).encode())

    def path_for(self, digest: str) -> Path:
        return self.directory / digest[:2] / f"{digest}.npy"

    def extract(
        self,
        paths: Sequence[str | Path],
        batch_size: int = 16,
        progress: Progress | None = None,
        strict: bool = False,
        warn: Callable[[str], None] | None = None,
        side: SideComputation | None = None,
        digests: Sequence[str | None] | None = None,
    ) -> FeatureSet:
        """Features for every readable file; unreadable ones are skipped with one warning each.

        ``side(image, digest)`` runs on the full decoded image of every file this call decodes (files
        already in the store are not decoded); its results come back in ``FeatureSet.side``.
        ``digests``: the files' sha256 when the caller has computed them already (None marks a file the
        caller found unreadable and reported; it is skipped here without a second warning).
        """
        warn = warn or (lambda msg: print(msg, file=sys.stderr))
        if digests is None:
            digests, errors = digest_files(paths, strict, warn)
        else:
            if len(digests) != len(paths):
                raise ValueError(f"{len(digests)} digests for {len(paths)} files")
            digests, errors = list(digests), []
        todo = [i for i, d in enumerate(digests) if d is not None and not self.path_for(d).exists()]
        n_cached = sum(1 for d in digests if d is not None) - len(todo)
        sides: dict[int, Any] = {}
        n_computed, failed = self._compute(paths, digests, todo, batch_size, progress, strict, warn, errors,
                                           side, sides)
        for i in failed:
            digests[i] = None
        kept = [i for i, d in enumerate(digests) if d is not None]
        matrix = self.matrix([digests[i] for i in kept])  # type: ignore[misc]
        return FeatureSet(matrix, kept, errors, n_cached=n_cached, n_computed=n_computed, digests=digests,
                          side=sides)

    def _compute(self, paths, digests, todo, batch_size, progress, strict, warn, errors, side, sides
                 ) -> tuple[int, list[int]]:
        """Compute and write the missing maps (this process's share under torchrun); returns
        (maps computed by all processes, indices of files that turned out unreadable)."""
        dist_info = distributed.setup(self.device)
        device = distributed.local_device(self.device)
        transform, tag = input_transform(self.backbone.preprocessing)
        files = ImageFiles(paths, transform, tag, positions=todo, digests=digests,
                           cache=DecodedImageCache(self.image_cache) if self.image_cache else None, side=side)
        sampler = None
        if dist_info.enabled:
            sampler = torch.utils.data.distributed.DistributedSampler(
                files, num_replicas=dist_info.world_size, rank=dist_info.rank, shuffle=False)
        share = len(sampler) if sampler is not None else len(files)
        failed: list[tuple[int, str]] = []
        computed: list[int] = []
        done = 0
        if progress:
            progress(0, share)
        engine = None
        try:
            for batch in image_loader(files, batch_size, self.workers, sampler) if todo else []:
                ok = [item for item in batch if item.error is None]
                for item in batch:
                    if item.error is not None:
                        if strict:
                            raise item.error
                        warn(f"skipped {item.error}")
                        errors.append(item.error)
                        failed.append((item.index, item.error.reason))
                if ok:
                    if engine is None:  # built on first use: a fully cached store exports nothing
                        engine = make_extractor(self.backbone, self.runtime, device, self.precision,
                                                self.directory / "backbone.onnx", warn)
                        self.engine_name = engine.name
                    x = to_input_tensor([item.image for item in ok], self.backbone.preprocessing)
                    for item, fmap in zip(ok, engine(x)):
                        self._write(digests[item.index], fmap)
                    computed.extend(item.index for item in ok)
                    sides.update((item.index, item.side) for item in ok if item.side is not None)
                done += len(batch)
                if progress:
                    progress(done, share)
        finally:
            self.backbone.to("cpu")
        if dist_info.enabled:
            # every process must agree on the skipped files before the matrix is assembled; the
            # sampler pads shares to equal length, so a map may have been computed twice
            gathered = distributed.all_gather_objects((computed, failed))
            computed = sorted({i for g in gathered for i in g[0]})
            mine = {i for i, _ in failed}
            for i, reason in sorted({f for g in gathered for f in g[1]}):
                if i not in mine:
                    errors.append(ImageReadError(Path(paths[i]), reason))
                    mine.add(i)
            failed = [f for g in gathered for f in g[1]]
        return len(computed), sorted({i for i, _ in failed})

    def matrix(self, digests: Sequence[str]) -> np.ndarray:
        """The stored maps of ``digests`` as one read-only memory-mapped (N, C, H, W) array.

        Built once per ordered list of images (rank 0 under torchrun) and reused by later runs.
        """
        if not digests:
            return np.zeros((0,), dtype=np.float32)
        target = self.directory / "matrices" / f"{matrix_key(digests)}-{len(digests)}.npy"
        if distributed.info().is_main and not target.exists():
            first = np.load(self.path_for(digests[0]), mmap_mode="r")
            rows = (np.load(self.path_for(d)) for d in digests)
            write_matrix(target, len(digests), tuple(first.shape), self.dtype, rows)
        distributed.barrier()
        return open_matrix(target)

    def _write(self, digest: str, fmap: np.ndarray) -> None:
        atomic_write(self.path_for(digest), lambda fh: np.save(fh, fmap.astype(self.dtype, copy=False)))
