"""Duplicate hashes computed once per file content: the on-disk HashCache and ``hash_files`` through it.

A file's hashes depend only on its bytes, so they are keyed by its sha256 and kept across runs (and across
commands: ``cxrnn train`` and ``cxrnn audit`` share them). The sha256 itself is computed once per file per
command: a caller that already has it (the feature store) passes ``digests``.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from cxrnn.audit.alignment import THUMB_SIZE
from cxrnn.audit.phash import HASH_SIZE, HASH_VERSION, PROBE_SHIFTS, ImageHashes, hash_image
from cxrnn.data.io import ImageReadError, as_read_error, read_image
from cxrnn.utils.atomic import atomic_write_bytes, atomic_write_text
from cxrnn.utils.cache import default_cache_dir
from cxrnn.utils.hashing import file_digest

Progress = Callable[[int, int], None]


class HashCache:
    """Hashes keyed by file content, kept in one JSON file so a re-run re-reads no image; the
    thumbnails of the alignment pass sit beside it as one PNG per file (grey + alpha = not padding).

    ``put`` hashes computed elsewhere (e.g. ``hash_side`` run by the feature store on the images it
    decodes) and ``save``: a later ``hash_files`` or ``find_duplicates`` then decodes none of those files.
    """

    def __init__(self, root: str | Path | None = None):
        base = Path(root) if root is not None else default_cache_dir()
        # The version and hash geometry are in the names: a change of either starts a fresh cache
        # instead of mixing incompatible hashes.
        self.path = base / "image-hashes" / f"v{HASH_VERSION}-{HASH_SIZE}-{len(PROBE_SHIFTS)}.json"
        self.thumb_dir = base / "image-hashes" / f"v{HASH_VERSION}-thumbs-{THUMB_SIZE}"
        self.entries: dict[str, dict] = {}
        self.pending: dict[str, ImageHashes] = {}  # thumbnails not yet written
        self.dirty = False
        try:
            self.entries = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.entries = {}

    def _thumb_path(self, sha256: str) -> Path:
        return self.thumb_dir / sha256[:2] / f"{sha256}.png"

    def get(self, sha256: str) -> ImageHashes | None:
        entry = self.entries.get(sha256)
        if not entry:
            return None
        if sha256 in self.pending:
            return self.pending[sha256]
        try:
            with Image.open(self._thumb_path(sha256)) as im:
                la = np.asarray(im.convert("LA"))
        except (OSError, ValueError):
            return None  # no thumbnail: hash the file again
        if la.shape[:2] != (THUMB_SIZE, THUMB_SIZE):
            return None
        hashes = ImageHashes.from_json(entry)
        hashes.thumb, hashes.fill = np.ascontiguousarray(la[..., 0]), la[..., 1] == 0
        return hashes

    def put(self, hashes: ImageHashes) -> None:
        if not hashes.sha256:
            raise ValueError("hashes without the file's sha256 cannot be cached: hash_image(image, sha256)")
        self.entries[hashes.sha256] = hashes.to_json()
        if hashes.thumb is not None:
            self.pending[hashes.sha256] = hashes
        self.dirty = True

    def save(self) -> None:
        if not self.dirty:
            return
        try:
            for sha, h in list(self.pending.items()):
                fill = h.fill if h.fill is not None else np.zeros_like(h.thumb, dtype=bool)
                la = np.stack([h.thumb, np.where(fill, 0, 255).astype(np.uint8)], axis=-1)
                buf = io.BytesIO()
                Image.fromarray(la, "LA").save(buf, format="PNG")
                atomic_write_bytes(self._thumb_path(sha), buf.getvalue())
                del self.pending[sha]
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Merge with what another process may have written meanwhile, then replace atomically.
            try:
                merged = {**json.loads(self.path.read_text()), **self.entries}
            except (OSError, ValueError):
                merged = self.entries
            atomic_write_text(self.path, json.dumps(merged))
            self.dirty = False
        except OSError:
            pass  # a read-only cache only costs speed


def hash_files(paths: Sequence[str | Path], cache: HashCache | None = None, progress: Progress | None = None,
               warn: Callable[[str], None] | None = None, digests: Sequence[str | None] | None = None
               ) -> tuple[list[ImageHashes | None], list[str]]:
    """Hashes per path (None for an unreadable file, with one error line 'PATH: reason').

    ``digests`` are the files' sha256 where the caller already has them (None where it has not), so
    files are not read twice for them."""
    if digests is not None and len(digests) != len(paths):
        raise ValueError(f"{len(digests)} digests for {len(paths)} paths")
    out: list[ImageHashes | None] = []
    errors: list[str] = []
    for k, p in enumerate(paths):
        try:
            sha = (digests[k] if digests is not None else None) or file_digest(p)
            cached = cache.get(sha) if cache is not None else None
            if cached is None:
                cached = hash_image(read_image(p), sha)
                if cache is not None:
                    cache.put(cached)
            out.append(cached)
        except (ImageReadError, OSError) as exc:
            errors.append(str(as_read_error(p, exc)))
            out.append(None)
        if errors and warn and out[-1] is None:
            warn(f"skipped {errors[-1]}")
        if progress:
            progress(k + 1, len(paths))
    if cache is not None:
        cache.save()
    return out, errors
