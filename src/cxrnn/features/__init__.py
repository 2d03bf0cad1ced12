"""Frozen-backbone features: the content-keyed store, the memory-mapped matrix, the extractors."""

from cxrnn.features.store import FeatureSet, FeatureStore

__all__ = ["FeatureSet", "FeatureStore"]
