"""First near-duplicate pass: perceptual hashes, which catch resized, re-encoded and barely shifted copies fast.

Every image gets a reference pHash (``imagehash``) of its blurred, downscaled centre, plus "probe" hashes
of the same centre shifted by a few pixels; two images are near-duplicates when the reference hash of one
is within ``threshold`` bits of any probe of the other. Chest radiographs all look alike at low
resolution, so the hash is 256 bits (hash_size 16) rather than the usual 64. Measured on 200 phantom
images (256 px): distinct images were >= 16 bits apart (0.1th percentile 30); half-size and JPEG q60
copies <= 4 bits; copies shifted by 2% of the side up to 18 bits (mean 11): this pass alone misses
larger shifts, crops, rotations and mirrored copies (``cxrnn.audit.alignment`` finds those).

Exact duplicates need no hash distance: they share the file's sha256 or the digest of the decoded pixels.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import imagehash
import numpy as np
from PIL import Image, ImageFilter

from cxrnn.audit.alignment import thumbnail
from cxrnn.data.io import to_uint8

# Bump whenever hash_image's output changes: cached hashes are keyed by it (cxrnn.audit.hash_cache).
HASH_VERSION = 2  # 2: thumbnails for the alignment pass
HASH_SIZE = 16  # 256-bit pHash
WORK_SIZE = 128  # images are reduced to this side before probing shifts
CROP = 112  # centre crop hashed (the margin leaves room for the probe shifts)
PROBE_SHIFTS = (-2, -1, 0, 1, 2)  # pixels at WORK_SIZE: +-1.6% of the image side


@dataclass
class ImageHashes:
    """Hashes of one file: content digests, perceptual hashes (bit arrays packed into uint64) and the
    alignment pass's thumbnail."""

    sha256: str
    pixels: str  # digest of the decoded, 8-bit quantised pixels: same picture in another container
    reference: np.ndarray  # (HASH_SIZE**2 // 64,) uint64
    probes: np.ndarray  # (len(PROBE_SHIFTS)**2, HASH_SIZE**2 // 64) uint64
    thumb: np.ndarray | None = None  # (THUMB_SIZE, THUMB_SIZE) uint8: the whole image squeezed square
    fill: np.ndarray | None = None  # bool like thumb: flat padding reaching the border (no content)

    def to_json(self) -> dict:  # the thumbnail is stored beside the JSON (HashCache)
        return {"sha256": self.sha256, "pixels": self.pixels, "reference": self.reference.tolist(),
                "probes": self.probes.tolist()}

    @classmethod
    def from_json(cls, d: dict) -> "ImageHashes":
        return cls(d["sha256"], d["pixels"], np.array(d["reference"], dtype=np.uint64),
                   np.array(d["probes"], dtype=np.uint64))


def _pack(bits: np.ndarray) -> np.ndarray:
    return np.packbits(bits.astype(np.uint8).ravel()).view(">u8").astype(np.uint64)


def hash_image(image: np.ndarray, sha256: str = "") -> ImageHashes:
    """Hashes of a grey [0,1] image (``sha256`` of its file, if known, is stored alongside)."""
    u8 = to_uint8(image)
    pixels = hashlib.sha256(np.ascontiguousarray(u8).tobytes() + str(u8.shape).encode()).hexdigest()
    # A light blur before hashing makes the hash ignore JPEG blocking and resampling aliasing.
    work = Image.fromarray(u8, "L").resize((WORK_SIZE, WORK_SIZE), Image.Resampling.BOX)
    work = work.filter(ImageFilter.GaussianBlur(1.0))
    margin = (WORK_SIZE - CROP) // 2
    probes = []
    for dy in PROBE_SHIFTS:
        for dx in PROBE_SHIFTS:
            box = (margin + dx, margin + dy, margin + dx + CROP, margin + dy + CROP)
            probes.append(_pack(imagehash.phash(work.crop(box), hash_size=HASH_SIZE).hash))
    probes_arr = np.stack(probes)
    centre = len(PROBE_SHIFTS) // 2
    reference = probes_arr[centre * len(PROBE_SHIFTS) + centre]
    thumb, fill = thumbnail(u8)
    return ImageHashes(sha256, pixels, reference, probes_arr, thumb, fill)


def hash_side(image: np.ndarray, digest: str | None) -> ImageHashes:
    """``hash_image`` as a ``cxrnn.data.loading.SideComputation``: given as ``side=hash_side`` to
    ``FeatureStore.extract`` or ``ImageFiles``, it hashes each image they decode anyway, in their workers,
    keyed by the file digest they computed. Put the results into a HashCache (``put``, then ``save``) or
    hand them to ``duplicate_group_ids(hashes=...)``; the duplicate pass then decodes none of those files."""
    return hash_image(image, digest or "")


def _popcount(x: np.ndarray) -> np.ndarray:
    return np.bitwise_count(x).sum(axis=-1, dtype=np.int64)


def hash_distance(a: ImageHashes, b: ImageHashes) -> int:
    """The Hamming distance close_pairs uses, for one pair."""
    return int(min(_popcount(a.reference[None] ^ b.probes).min(), _popcount(b.reference[None] ^ a.probes).min()))


def close_pairs(hashes: Sequence[ImageHashes], threshold: int) -> list[tuple[int, int, int]]:
    """(i, j, bits) for i < j within ``threshold``: the Hamming distance is the min over probes of either
    image against the other's reference. Rows are done in chunks, so memory stays O(chunk x N), not N^2
    (a full int64 matrix was ~390 MB at 7,000 images)."""
    ref = np.stack([h.reference for h in hashes])  # (N, W)
    probes = np.stack([h.probes for h in hashes])  # (N, P, W)
    n = len(hashes)
    chunk = max(1, 4_000_000 // max(1, n * probes.shape[1] * probes.shape[2]))
    pairs: list[tuple[int, int, int]] = []
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        # Only columns from ``start`` on (the upper triangle), in both directions: this chunk's references
        # against their probes, and their references against this chunk's probes.
        d = np.minimum(_popcount(ref[start:stop, None, None, :] ^ probes[None, start:]).min(axis=2),
                       _popcount(probes[start:stop, None, :, :] ^ ref[None, start:, None, :]).min(axis=2))
        rows, cols = np.nonzero(d <= threshold)
        keep = cols > rows
        pairs += [(int(r) + start, int(c) + start, int(d[r, c])) for r, c in zip(rows[keep], cols[keep])]
    return pairs

