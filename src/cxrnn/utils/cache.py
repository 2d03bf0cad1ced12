"""Where cxrnn keeps what it can recompute: feature maps, decoded images, duplicate hashes."""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    """``$CXRNN_CACHE_DIR``, else ``$XDG_CACHE_HOME/cxrnn/features`` (``~/.cache/cxrnn/features``)."""
    env = os.environ.get("CXRNN_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache"))
    return Path(base) / "cxrnn" / "features"
