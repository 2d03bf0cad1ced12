"""The ``cxrnn`` command line: a thin layer over the Python API; it parses arguments and prints.

Each module holds the commands named after it and registers them on ``app``; the import order below is
the order of ``cxrnn --help`` (the pipeline's: data, audit, features and training, scoring, maps, export,
serving, the demo).
"""

from cxrnn.cli.common import app
from cxrnn.cli import data  # noqa: F401  (registers phantom, backbones)
from cxrnn.cli import audit  # noqa: F401  (audit)
from cxrnn.cli import train  # noqa: F401  (extract, train, compare)
from cxrnn.cli import predict  # noqa: F401  (evaluate, predict)
from cxrnn.cli import explain  # noqa: F401  (explain, explain-eval)
from cxrnn.cli import export  # noqa: F401  (export)
from cxrnn.cli import serve  # noqa: F401  (serve)
from cxrnn.cli import pacs  # noqa: F401  (pacs predict, pacs watch)
from cxrnn.cli import demo  # noqa: F401  (demo)

__all__ = ["app"]
