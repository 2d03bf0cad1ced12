"""The feature store takes digests its caller computed and hands back what it saw while decoding."""

from __future__ import annotations

import numpy as np
import pytest

from cxrnn.audit.phash import hash_image, hash_side
from cxrnn.data import loading
from cxrnn.data.io import read_image
from cxrnn.data.phantom import PhantomConfig, generate_phantom
from cxrnn.features.store import FeatureStore
from cxrnn.models.backbones import create_backbone
from cxrnn.utils.hashing import file_digest


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("store-phantom")
    generate_phantom(root, PhantomConfig(per_class=3, size=64, seed=5))
    return sorted(str(p) for p in root.rglob("*.png") if "mask" not in p.parent.name and "_mask" not in p.name)


def test_given_digests_the_store_reads_no_file_to_hash_it(files, tmp_path, monkeypatch) -> None:
    paths = files + [str(tmp_path / "gone.png")]
    digests = [file_digest(p) for p in files] + [None]  # the caller already found the last one unreadable

    def no_second_digest(path):
        raise AssertionError(f"{path} was hashed again")

    monkeypatch.setattr(loading, "file_digest", no_second_digest)
    store = FeatureStore(create_backbone("test_efficientnet", "none", seed=0), tmp_path / "cache", runtime="torch")
    result = store.extract(paths, digests=digests, side=hash_side, warn=lambda msg: None)
    assert result.kept == list(range(len(files))) and result.errors == []
    assert result.digests == digests and result.n_computed == len(files)
    # every decoded image's duplicate hashes came back, equal to hashing the file on its own
    assert sorted(result.side) == list(range(len(files)))
    for i in (0, len(files) - 1):
        expected = hash_image(read_image(files[i]), digests[i])
        assert result.side[i].sha256 == digests[i]
        np.testing.assert_array_equal(result.side[i].probes, expected.probes)
    # a second pass finds every map stored: nothing is decoded, so no side results
    again = store.extract(paths, digests=digests, side=hash_side, warn=lambda msg: None)
    assert again.n_computed == 0 and again.side == {}
    with pytest.raises(ValueError, match="digests for"):
        store.extract(paths, digests=digests[:-1])
