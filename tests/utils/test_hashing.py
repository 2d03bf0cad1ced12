"""Content identities: what keys every cache and the fine-tuned weights id."""

from __future__ import annotations

import os

import pytest
import torch

from cxrnn.utils.hashing import bytes_digest, file_digest, sequence_digest, state_digest


def test_file_and_bytes_digests_agree_and_a_fifo_is_refused_without_blocking(tmp_path) -> None:
    data = os.urandom(3 << 20)  # spans several read chunks
    (tmp_path / "a.bin").write_bytes(data)
    assert file_digest(tmp_path / "a.bin") == bytes_digest(data)
    os.mkfifo(tmp_path / "pipe.png")  # opening it for reading would wait for a writer forever
    with pytest.raises(OSError, match="not a regular file"):
        file_digest(tmp_path / "pipe.png")


def test_sequence_digest_depends_on_order() -> None:
    assert sequence_digest(["a", "b"]) != sequence_digest(["b", "a"])
    assert sequence_digest(["ab"]) != sequence_digest(["a", "b"])


def test_state_digest_follows_the_values_not_the_object() -> None:
    torch.manual_seed(0)
    a = torch.nn.Linear(4, 3)
    b = torch.nn.Linear(4, 3)
    b.load_state_dict(a.state_dict())
    assert state_digest(a.state_dict()) == state_digest(b.state_dict())
    with torch.no_grad():
        b.bias[0] += 1e-6
    assert state_digest(a.state_dict()) != state_digest(b.state_dict())
    # scalars (BatchNorm's num_batches_tracked) and a changed dtype count too
    bn = torch.nn.BatchNorm1d(2)
    assert state_digest(bn.state_dict()) != state_digest({k: v.double() for k, v in bn.state_dict().items()})
