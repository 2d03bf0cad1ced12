"""Exact and near-duplicate images, grouped, so that copies never sit on both sides of a split.

Exact duplicates share file bytes or decoded pixels. Near-duplicates are found in two passes:
perceptual hashes for resized, re-encoded and barely shifted copies (``cxrnn.audit.phash``), then
alignment for shifted, cropped, rotated and mirrored ones (``cxrnn.audit.alignment``). Hashes and
thumbnails are computed once per file content and cached (``cxrnn.audit.hash_cache``).

Groups are the connected components of all duplicate pairs (union-find). The two thresholds that decide
what counts as a copy, ``DEFAULT_THRESHOLD`` (pHash bits) and ``DEFAULT_ALIGN_THRESHOLD`` (NCC after
alignment), are importable from here, next to the functions that take them, and so are ``HashCache``
and ``hash_side``, which let a command that decodes the images anyway fill the cache on the way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cxrnn.audit.alignment import aligned_pairs
from cxrnn.audit.hash_cache import HashCache, hash_files
from cxrnn.audit.phash import ImageHashes, close_pairs, hash_distance, hash_side
from cxrnn.audit.thresholds import DEFAULT_ALIGN_THRESHOLD, DEFAULT_THRESHOLD
from cxrnn.data.groups import UnionFind

# What a caller of the duplicate pass needs, in one place: the two thresholds, the cache it reads and
# the side computation that fills it while images are decoded for something else.
__all__ = ["DEFAULT_ALIGN_THRESHOLD", "DEFAULT_THRESHOLD", "DuplicateReport", "HashCache", "duplicate_group_ids",
           "find_duplicates", "hash_side"]

Progress = Callable[[int, int], None]


@dataclass
class DuplicateReport:
    """Duplicate groups over ``paths`` (indices into it) plus the pairs that formed them."""

    paths: list[str]
    groups: list[list[int]]  # each a sorted list of >= 2 indices
    exact_pairs: list[tuple[int, int]] = field(default_factory=list)
    # (i, j, bits): pHash pairs within ``threshold`` bits, then the pairs the alignment pass added
    # (their bits, larger than ``threshold``, are the pHash distance the first pass saw)
    near_pairs: list[tuple[int, int, int]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    threshold: int = DEFAULT_THRESHOLD
    aligned_pairs: list[tuple[int, int, float]] = field(default_factory=list)  # (i, j, NCC), also in near_pairs
    align_threshold: float | None = DEFAULT_ALIGN_THRESHOLD

    def group_ids(self) -> np.ndarray:
        """One id per path: members of a duplicate group share it, every other image is its own group."""
        ids = np.arange(len(self.paths))
        for g in self.groups:
            ids[g] = g[0]
        return ids

    def kind_of(self, group: Sequence[int]) -> str:
        """'exact' when every member has an exact copy in the group, 'near' when none has, else 'exact+near'."""
        members = set(group)
        exact = {i for p in self.exact_pairs for i in p if set(p) <= members}
        return "exact" if exact == members else ("near" if not exact else "exact+near")


def find_duplicates(paths: Sequence[str | Path], threshold: int = DEFAULT_THRESHOLD, cache: HashCache | None = None,
                    progress: Progress | None = None, warn: Callable[[str], None] | None = None,
                    align_threshold: float | None = DEFAULT_ALIGN_THRESHOLD,
                    digests: Sequence[str | None] | None = None) -> DuplicateReport:
    """Exact and near-duplicate groups among ``paths`` (unreadable files are listed in ``errors``).

    A negative ``threshold`` turns near-duplicate detection off; ``align_threshold`` None or 0 only the
    alignment pass. ``digests``: the files' sha256 where the caller already computed them."""
    paths = [str(p) for p in paths]
    hashes, errors = hash_files(paths, cache, progress, warn, digests)
    ok = [i for i, h in enumerate(hashes) if h is not None]
    uf = UnionFind(len(paths))
    exact: list[tuple[int, int]] = []
    near: list[tuple[int, int, int]] = []
    aligned: list[tuple[int, int, float]] = []
    first_seen: dict[str, int] = {}
    for i in ok:
        h = hashes[i]
        for key in (f"file:{h.sha256}", f"pixels:{h.pixels}"):  # type: ignore[union-attr]
            if key in first_seen:
                j = first_seen[key]
                if uf.find(i) != uf.find(j):
                    exact.append((j, i))
                uf.union(i, j)
            else:
                first_seen[key] = i
    if len(ok) > 1 and threshold >= 0:
        exact_set = {tuple(sorted(p)) for p in exact}
        for x, y, bits in close_pairs([hashes[i] for i in ok], threshold):  # type: ignore[misc]
            i, j = ok[x], ok[y]
            if (i, j) not in exact_set:
                near.append((i, j, bits))
            uf.union(i, j)
        if align_threshold:
            have = [x for x, i in enumerate(ok) if hashes[i].thumb is not None]  # type: ignore[union-attr]
            thumbs = np.stack([hashes[ok[x]].thumb for x in have]) if have else None  # type: ignore[union-attr]
            fills = np.stack([hashes[ok[x]].fill for x in have]) if have else None  # type: ignore[union-attr]
            if len(have) > 1:
                found = aligned_pairs(thumbs, fills, align_threshold,
                                      skip=lambda u, v: uf.find(ok[have[u]]) == uf.find(ok[have[v]]))
                for u, v, c in found:
                    x, y = have[u], have[v]
                    i, j = ok[x], ok[y]
                    near.append((i, j, hash_distance(hashes[i], hashes[j])))  # type: ignore[arg-type]
                    aligned.append((i, j, c))
                    uf.union(i, j)
    groups = [c for c in uf.components() if len(c) > 1]
    groups.sort(key=lambda g: (-len(g), g[0]))
    return DuplicateReport(paths, groups, exact, near, errors, threshold, aligned, align_threshold or None)


def duplicate_group_ids(paths: Sequence[str | Path], threshold: int = DEFAULT_THRESHOLD,
                        cache_root: str | Path | None = None,
                        align_threshold: float | None = DEFAULT_ALIGN_THRESHOLD,
                        digests: Sequence[str | None] | None = None,
                        hashes: Iterable[ImageHashes | None] = ()) -> tuple[np.ndarray, DuplicateReport]:
    """Group ids for a group-aware split: one id per duplicate group, singletons keep their own.

    ``digests`` (the files' sha256, e.g. ``FeatureSet.digests``) and ``hashes`` (ImageHashes already
    computed, e.g. the ``FeatureSet.side`` values of ``side=hash_side``) spare reading and decoding
    the files again; the hashes are added to the cache under ``cache_root``."""
    cache = HashCache(cache_root)
    for h in hashes:
        if h is not None:
            cache.put(h)
    report = find_duplicates(paths, threshold, cache, align_threshold=align_threshold, digests=digests)
    return report.group_ids(), report

