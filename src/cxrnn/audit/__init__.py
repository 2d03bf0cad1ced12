"""Dataset and model audits: duplicates, label conflicts, metadata and source shortcuts.

``run_audit`` and ``write_audit`` are imported on first use, so reading ``cxrnn.audit.thresholds`` (the
command line does) does not pull in torch.
"""

from typing import Any

__all__ = ["run_audit", "write_audit"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from cxrnn.audit import report

        return getattr(report, name)
    raise AttributeError(f"module 'cxrnn.audit' has no attribute {name!r}")
