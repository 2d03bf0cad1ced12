"""Parallel image decoding for extraction and fine-tuning: a torch Dataset, DataLoader workers, and an
optional on-disk cache of decoded images already resized to the model's input size.

Decoding a large PNG or a compressed DICOM can cost as much as a small backbone's forward pass
(benchmarks/inference.py prints both), so decoding runs in DataLoader worker processes and, with an
image cache, happens once per file and input size instead of once per run.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from cxrnn.data.errors import READER_VERSION
from cxrnn.data.io import ImageReadError, as_read_error, read_image
from cxrnn.utils.atomic import atomic_write
from cxrnn.utils.hashing import file_digest

# A decoded grey [0,1] image -> what the consumer wants (e.g. resized to a backbone's input); it runs in
# the DataLoader workers, so it must be picklable (a module-level function or a functools.partial).
Transform = Callable[[np.ndarray], np.ndarray]
# Something else computed from the full decoded image while it is in memory (e.g. duplicate hashes), so
# that a command needing the image twice decodes it once; also runs in the workers.
SideComputation = Callable[[np.ndarray, "str | None"], Any]


def digest_files(paths: Sequence[str | Path], strict: bool, warn: Callable[[str], None]
                 ) -> tuple[list[str | None], list[ImageReadError]]:
    """Each file's sha256 (None where it cannot be read, with one ``skipped`` warning, or the error
    raised when ``strict``): computed once per command and handed to every cache that needs it."""
    digests: list[str | None] = []
    errors: list[ImageReadError] = []
    for p in paths:
        try:
            digests.append(file_digest(p))
        except OSError as exc:
            err = as_read_error(p, exc)
            if strict:
                raise err from exc
            warn(f"skipped {err}")
            errors.append(err)
            digests.append(None)
    return digests, errors


class DecodedImageCache:
    """Transformed images stored as ``.npy`` per (file content, transform tag).

    Values are exactly what the transform computes from the decoded file, so features from a cached image
    equal those from the file.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path_for(self, digest: str, tag: str) -> Path:
        key = hashlib.sha256(f"{digest}:{tag}:reader{READER_VERSION}".encode()).hexdigest()
        return self.root / key[:2] / f"{key}.npy"

    def get(self, digest: str, tag: str) -> np.ndarray | None:
        target = self.path_for(digest, tag)
        if target.exists():
            try:
                return np.load(target)
            except (OSError, ValueError):
                pass  # a damaged entry is rebuilt by the caller
        return None

    def put(self, digest: str, tag: str, image: np.ndarray) -> None:
        atomic_write(self.path_for(digest, tag), lambda fh: np.save(fh, image))


@dataclass
class LoadedImage:
    index: int
    image: np.ndarray | None
    error: ImageReadError | None
    side: Any = None  # the side computation's result; None when it did not run (cache hit, none asked)


class ImageFiles(torch.utils.data.Dataset):
    """Item ``i`` is (i, transformed grey image or None, read error or None): a bad file is a value,
    so one unreadable image never kills a DataLoader worker or a batch.

    ``tag`` names the transform in the decoded-image cache; ``side`` (optional) is computed on the full
    decoded image whenever the file is actually decoded.
    """

    def __init__(self, paths: Sequence[str | Path], transform: Transform, tag: str,
                 positions: Sequence[int] | None = None, digests: Sequence[str | None] | None = None,
                 cache: DecodedImageCache | None = None, side: SideComputation | None = None):
        self.paths = [str(p) for p in paths]
        self.transform = transform
        self.tag = tag
        self.positions = list(range(len(self.paths))) if positions is None else list(positions)
        self.digests = digests
        self.cache = cache
        self.side = side

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, item: int) -> LoadedImage:
        i = self.positions[item]
        digest = self.digests[i] if self.digests is not None else None
        try:
            if self.cache is not None and digest:
                cached = self.cache.get(digest, self.tag)
                if cached is not None:
                    return LoadedImage(i, cached, None)
            full = read_image(self.paths[i])
            image = self.transform(full)
            if self.cache is not None and digest:
                self.cache.put(digest, self.tag, image)
            return LoadedImage(i, image, None, self.side(full, digest) if self.side is not None else None)
        except ImageReadError as err:
            return LoadedImage(i, None, err)


def collate_loaded(items: list[LoadedImage]) -> list[LoadedImage]:
    return items


def image_loader(dataset: ImageFiles, batch_size: int, workers: int = 0,
                 sampler: torch.utils.data.Sampler | None = None) -> torch.utils.data.DataLoader:
    """Batches of LoadedImage in dataset order (or the sampler's); ``workers`` decoding processes."""
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, sampler=sampler, num_workers=max(0, workers),
        collate_fn=collate_loaded, persistent_workers=False,
        prefetch_factor=2 if workers > 0 else None,
    )
