"""The optimizers: the chunked RMSprop (PyTorch's numbers bit for bit) and its compiled one-pass update."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cxrnn.training import optim
from cxrnn.training.config import TrainConfig
from cxrnn.training.optim import ChunkedRMSprop, fused_rmsprop_update, make_optimizer


def _params() -> list[torch.Tensor]:
    torch.manual_seed(0)
    # larger than a chunk (uneven tail), small, and non-contiguous
    return [torch.randn(ChunkedRMSprop.CHUNK + 1234), torch.randn(30, 40), torch.randn(50, 60).t()]


def _run_both(params: list[torch.Tensor], decay: float, steps: int = 3):
    ours = [p.clone().requires_grad_() for p in params]
    theirs = [p.clone().requires_grad_() for p in params]
    a = ChunkedRMSprop(ours, lr=1e-3, alpha=0.9, eps=1e-7, weight_decay=decay)
    b = torch.optim.RMSprop(theirs, lr=1e-3, alpha=0.9, eps=1e-7, weight_decay=decay, foreach=False)
    for _ in range(steps):
        for p, q in zip(ours, theirs):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        a.step()
        b.step()
    return ours, theirs, a, b


def test_chunked_rmsprop_is_pytorchs_rmsprop_bit_for_bit(monkeypatch) -> None:
    monkeypatch.setattr(ChunkedRMSprop, "FUSED_MIN_ELEMENTS", 1 << 40)  # the eager chunked update only
    ours, theirs, a, b = _run_both(_params(), decay=0.01)
    assert all(torch.equal(p, q) for p, q in zip(ours, theirs))
    b.load_state_dict(a.state_dict())  # the same state: either optimizer resumes the other's


@pytest.mark.parametrize("decay", [0.0, 0.01])
def test_the_compiled_update_is_pytorchs_rmsprop_to_float_rounding(monkeypatch, decay: float) -> None:
    if fused_rmsprop_update() is None:
        pytest.skip(f"PyTorch's compiler does not work here: {optim._FUSED_STATE}")
    monkeypatch.setattr(ChunkedRMSprop, "FUSED_MIN_ELEMENTS", 1000)  # the first two tensors take it
    calls = []
    original = optim.fused_rmsprop_update
    monkeypatch.setattr(optim, "fused_rmsprop_update", lambda: calls.append(1) or original())
    params = _params()
    ours, theirs, a, b = _run_both(params, decay=decay, steps=5)
    assert len(calls) == 2 * 5  # the large contiguous ones; the transposed one is chunked
    for p, q, start in zip(ours, theirs, params):
        assert not torch.equal(p, start)
        # an ulp or so: ATen fuses two multiply-adds and its float sqrt is not correctly rounded
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-8)
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(a.state[p]["square_avg"], b.state[q]["square_avg"], rtol=1e-6, atol=1e-10)
    # a new learning rate (the schedule's, every epoch) reaches the compiled kernel
    before = ours[0].detach().clone()
    a.param_groups[0]["lr"] = 0.0
    ours[0].grad = torch.randn_like(ours[0])
    a.step()
    assert torch.equal(ours[0], before)


def test_make_optimizer_uses_the_fast_implementations() -> None:
    params = [nn.Parameter(torch.randn(4))]
    assert isinstance(make_optimizer(params, TrainConfig(optimizer="rmsprop")), ChunkedRMSprop)
    for name in ("adam", "adamw", "sgd"):
        assert make_optimizer(params, TrainConfig(optimizer=name)).defaults["fused"] is True
