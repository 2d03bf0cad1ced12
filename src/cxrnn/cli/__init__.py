"""The ``cxrnn`` command line: a thin layer over the Python API (each module adds its commands)."""

from cxrnn.cli.common import app
from cxrnn.cli import core  # noqa: F401  (registers the commands)
from cxrnn.cli import explain  # noqa: F401
from cxrnn.cli import serve  # noqa: F401
from cxrnn.cli import perf  # noqa: F401
from cxrnn.cli import audit  # noqa: F401

__all__ = ["app"]
