"""Content identities: the sha256 of a file, of a tensor state, of an ordered list of digests.

A file's digest is the identity of an image in every cache (feature store, decoded images, duplicate
hashes) and of a model file's version; it is computed once per file per command and handed on.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from pathlib import Path
from typing import Iterable, Mapping

import torch


def bytes_digest(data: bytes) -> str:
    """sha256 of bytes already in memory: equals ``file_digest`` of a file holding them."""
    return hashlib.sha256(data).hexdigest()


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes, read in chunks; anything but a regular file is an OSError, because
    opening a FIFO blocks forever and a device such as /dev/zero never ends."""
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise OSError(errno.EINVAL, "not a regular file", str(path))
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sequence_digest(digests: Iterable[str]) -> str:
    """Identity of an ordered list of digests (e.g. the images of one feature matrix)."""
    h = hashlib.sha256()
    for d in digests:
        h.update(d.encode())
        h.update(b"\n")
    return h.hexdigest()


def state_digest(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 over a state dict's names, dtypes, shapes and values: two sets of weights share it only
    when they are equal, whatever object or file they came from."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
