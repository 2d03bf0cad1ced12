"""HTTP serving: ``create_app`` (FastAPI) with the web page, micro-batching and the OOD gate."""

from cxrnn.serve.app import create_app

__all__ = ["create_app"]
