"""The ``cxrnn`` command line: a thin layer over the Python API (each module adds its commands)."""

from cxrnn.cli.common import app
from cxrnn.cli import core  # noqa: F401  (registers the commands)

__all__ = ["app"]
