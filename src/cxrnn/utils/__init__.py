"""Helpers every stage uses: atomic writes, content digests, cache locations, multi-process runs."""
