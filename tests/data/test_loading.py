"""The caches in front of the reader: an entry an older reader wrote is never served by a newer one."""

from __future__ import annotations

import numpy as np

import cxrnn.data.loading as loading
from cxrnn.data.loading import DecodedImageCache


def test_decoded_image_cache_is_keyed_by_the_reader_version(tmp_path, monkeypatch):
    cache = DecodedImageCache(tmp_path)
    image = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    cache.put("a" * 64, "224:bilinear", image)
    assert np.array_equal(cache.get("a" * 64, "224:bilinear"), image)
    # A reader that refuses more (e.g. CT slices) must read the file again, not reuse the old decode.
    monkeypatch.setattr(loading, "READER_VERSION", loading.READER_VERSION + 1)
    assert cache.get("a" * 64, "224:bilinear") is None


def test_feature_store_key_names_the_reader_version(monkeypatch):
    import cxrnn.features.store as store
    from cxrnn.models.backbones import create_backbone

    backbone = create_backbone("test_efficientnet", "none", seed=0)
    before = store.FeatureStore(backbone, root="/nonexistent-not-created").key
    monkeypatch.setattr(store, "READER_VERSION", store.READER_VERSION + 1)
    assert store.FeatureStore(backbone, root="/nonexistent-not-created").key != before
