"""Dataset and model audits: duplicates, label conflicts, metadata and source shortcuts."""

from cxrnn.audit.report import run_audit, write_audit

__all__ = ["run_audit", "write_audit"]
