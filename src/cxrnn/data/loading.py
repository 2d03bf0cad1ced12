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
from typing import Sequence

import numpy as np
import torch

from cxrnn.atomic import atomic_write
from cxrnn.data.io import ImageReadError, read_image
from cxrnn.models.backbones import Preprocessing
from cxrnn.models.preprocess import resize_to_input


class DecodedImageCache:
    """Grey images resized to one input size, stored as ``.npy`` per (file content, size, interpolation).

    Values are exactly what ``to_input_tensor`` would compute from the decoded file, so features from a
    cached image equal those from the file.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path_for(self, digest: str, prep: Preprocessing) -> Path:
        tag = hashlib.sha256(f"{digest}:{prep.input_size}:{prep.interpolation}".encode()).hexdigest()
        return self.root / tag[:2] / f"{tag}.npy"

    def load(self, path: str | Path, digest: str, prep: Preprocessing) -> np.ndarray:
        target = self.path_for(digest, prep)
        if target.exists():
            try:
                return np.load(target)
            except (OSError, ValueError):
                pass  # a damaged cache entry is rebuilt below
        image = resize_to_input(read_image(path), prep)
        atomic_write(target, lambda fh: np.save(fh, image))
        return image


@dataclass
class LoadedImage:
    index: int
    image: np.ndarray | None
    error: ImageReadError | None


class ImageFiles(torch.utils.data.Dataset):
    """Item ``i`` is (i, grey image at input size or None, read error or None): a bad file is a value,
    so one unreadable image never kills a DataLoader worker or a batch."""

    def __init__(self, paths: Sequence[str | Path], prep: Preprocessing, positions: Sequence[int] | None = None,
                 digests: Sequence[str | None] | None = None, cache: DecodedImageCache | None = None):
        self.paths = [str(p) for p in paths]
        self.prep = prep
        self.positions = list(range(len(self.paths))) if positions is None else list(positions)
        self.digests = digests
        self.cache = cache

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, item: int) -> LoadedImage:
        i = self.positions[item]
        try:
            digest = self.digests[i] if self.digests is not None else None
            if self.cache is not None and digest:
                image = self.cache.load(self.paths[i], digest, self.prep)
            else:
                image = resize_to_input(read_image(self.paths[i]), self.prep)
            return LoadedImage(i, image, None)
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
