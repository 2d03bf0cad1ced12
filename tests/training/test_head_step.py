"""The paper head's training step: the frozen-LSTM cache, the LSTM's backward, the resident weight gradient."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from cxrnn.models import heads
from cxrnn.models.heads import ReluLSTM, ResidentGradLinear, create_head
from cxrnn.training.config import PRESETS, TrainConfig
from cxrnn.training.loop import fit_head, rows_logits


def _tiny_paper_head(seed: int, freeze_rnn: bool) -> nn.Module:
    torch.manual_seed(seed)
    return create_head("paper", 6, 4, 3, lstm_units=5, dense=[8], freeze_rnn=freeze_rnn)


def _tiny_data():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((30, 6, 2, 2)).astype(np.float32)
    y = np.arange(30) % 3
    x[np.arange(30), y] += 2.0  # learnable: the class raises one channel
    return x, y


def test_cached_frozen_lstm_trains_the_same_head_without_running_the_lstm_per_step() -> None:
    x, y = _tiny_data()
    cfg = TrainConfig(**{**PRESETS["paper"], "epochs": 4, "batch_size": 4})
    runs = {}
    for cache in (True, False):
        head = _tiny_paper_head(1, freeze_rnn=True)
        calls = []
        head.rnn.register_forward_hook(lambda m, i, o: calls.append(len(i[0])))
        fit = fit_head(head, x[:22], y[:22], x[22:], y[22:], cfg, seed=3, cache_frozen_rnn=cache)
        runs[cache] = (fit, head, calls)
    (cached, cached_head, cached_calls), (plain, plain_head, plain_calls) = runs[True], runs[False]
    # with the cache the LSTM runs once per image (train and validation rows), never inside a step
    assert cached_calls == [22, 8]
    assert len(plain_calls) > 4 * 22 // 4
    for a, b in zip(cached.history, plain.history):
        for key in ("train_loss", "train_acc", "val_loss", "val_acc"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
    assert cached.best_epoch == plain.best_epoch
    for k, v in cached_head.state_dict().items():
        # float tolerance relative to each tensor's scale: the LSTM's outputs at the cache's batch and at the
        # step's differ in the last bits, and 4 epochs of batch norm at batch 4 carry that to ~1e-5
        scale = float(v.float().abs().max()) or 1.0
        torch.testing.assert_close(v, plain_head.state_dict()[k], rtol=0, atol=1e-4 * scale, msg=k)
    torch.testing.assert_close(rows_logits(cached_head, x), rows_logits(plain_head, x), rtol=1e-5, atol=1e-5)
    assert not torch.equal(cached_head.classifier.weight, _tiny_paper_head(1, freeze_rnn=True).classifier.weight)


def test_a_trainable_lstm_is_not_cached() -> None:
    x, y = _tiny_data()
    head = _tiny_paper_head(1, freeze_rnn=False)
    before = head.rnn.recurrent.weight.detach().clone()
    fit_head(head, x[:22], y[:22], x[22:], y[22:], TrainConfig(**{**PRESETS["paper"], "epochs": 1, "batch_size": 4}),
             seed=0)
    assert not torch.equal(before, head.rnn.recurrent.weight)


def _reference_relu_lstm(lstm: ReluLSTM, seq: torch.Tensor) -> torch.Tensor:
    """The step-by-step textbook form (Keras LSTM(activation='relu'))."""
    h = seq.new_zeros(seq.shape[0], lstm.hidden_size)
    c = torch.zeros_like(h)
    out = []
    for t in range(seq.shape[1]):
        i, f, g, o = (lstm.input_proj(seq[:, t]) + lstm.recurrent(h)).chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.relu(g)
        h = torch.sigmoid(o) * torch.relu(c)
        out.append(h)
    return torch.stack(out, dim=1)


def test_relu_lstm_matches_the_step_by_step_form_forward_and_backward() -> None:
    torch.manual_seed(0)
    lstm = ReluLSTM(7, 5)
    seq = torch.randn(3, 6, 7)
    fast, slow = lstm(seq), _reference_relu_lstm(lstm, seq)
    torch.testing.assert_close(fast, slow)
    g_fast = torch.autograd.grad(fast.square().sum(), list(lstm.parameters()))
    g_slow = torch.autograd.grad(slow.square().sum(), list(lstm.parameters()))
    for a, b in zip(g_fast, g_slow):
        torch.testing.assert_close(a, b)


def test_relu_lstm_backward_through_time_passes_gradcheck() -> None:
    """The hand-written backward (one recurrent-weight matmul for all steps) against finite differences."""
    torch.manual_seed(3)
    gates_x = torch.randn(3, 5, 4 * 4, dtype=torch.float64, requires_grad=True)
    w_rec = torch.randn(4 * 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(heads._ReluLSTMFn.apply, (gates_x, w_rec))


def test_relu_lstm_paths_agree_training_inference_and_export() -> None:
    torch.manual_seed(0)
    lstm = ReluLSTM(7, 5)
    seq = torch.randn(4, 9, 7)
    trained = lstm(seq.clone().requires_grad_())  # the autograd Function
    with torch.no_grad():
        inferred = lstm(seq)  # the in-place loop
        traced = lstm._traceable(lstm.input_proj(seq))  # what exporters see
    assert trained.grad_fn is not None and "ReluLSTMFn" in type(trained.grad_fn).__name__
    torch.testing.assert_close(trained.detach(), inferred)
    torch.testing.assert_close(traced, inferred)
    frozen = ReluLSTM(7, 5).requires_grad_(False)
    assert frozen(seq).grad_fn is None  # nothing to train: no graph, no saved steps


def test_cpu_linear_is_f_linear_with_or_without_onednn(monkeypatch) -> None:
    torch.manual_seed(0)
    x, w, b = torch.randn(16, 300), torch.randn(40, 300), torch.randn(40)
    for onednn in (True, False):
        monkeypatch.setattr(heads, "_ONEDNN_LINEAR", onednn if onednn is False else None)
        torch.testing.assert_close(heads.cpu_linear(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-4)
        g = torch.randn(16, 40)
        torch.testing.assert_close(heads.cpu_linear(g, w.t()), g @ w, rtol=1e-5, atol=1e-4)
    assert heads.cpu_linear(x.double(), w.double()).dtype == torch.float64  # other dtypes: F.linear


def test_packed_recurrent_weight_gives_the_plain_products(monkeypatch) -> None:
    torch.manual_seed(0)
    w = torch.randn(64, 24)
    packed = heads.packed_for_cpu_linear(w, 16)
    if heads.cpu_linear_backend() == "oneDNN":
        assert packed.is_mkldnn  # reordered once, reused by every step's product
    for rows in (16, 5, 40):  # the batch it was packed for, and others
        h = torch.randn(rows, 24)
        torch.testing.assert_close(heads.cpu_linear(h, packed), F.linear(h, w), rtol=1e-5, atol=1e-5)
    g = torch.randn(16, 64)
    torch.testing.assert_close(heads.cpu_linear(g, heads.packed_for_cpu_linear(w.t(), 16)), g @ w, rtol=1e-5, atol=1e-5)
    assert heads.packed_for_cpu_linear(w.double(), 16).dtype == torch.float64  # nothing to pack: the weight itself
    monkeypatch.setattr(heads, "_ONEDNN_LINEAR", False)
    assert heads.packed_for_cpu_linear(w, 16) is w


def test_relu_lstm_with_and_without_the_packed_weight_agree(monkeypatch) -> None:
    torch.manual_seed(1)
    lstm = ReluLSTM(12, 8)
    seq = torch.randn(16, 9, 12)
    runs = []
    for onednn in (None, False):  # None: probe (packs where oneDNN works); False: F.linear, no packing
        monkeypatch.setattr(heads, "_ONEDNN_LINEAR", onednn)
        out = lstm(seq)
        grads = torch.autograd.grad(out.square().sum(), list(lstm.parameters()))
        with torch.no_grad():
            runs.append((out.detach(), grads, lstm(seq)))
    (out_a, grads_a, inf_a), (out_b, grads_b, inf_b) = runs
    torch.testing.assert_close(out_a, out_b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(inf_a, inf_b, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_resident_grad_linear_is_nn_linear_with_its_gradient_buffer_reused() -> None:
    torch.manual_seed(0)
    ours, theirs = ResidentGradLinear(12, 5), nn.Linear(12, 5)
    theirs.load_state_dict(ours.state_dict())
    assert list(ours.state_dict()) == ["weight", "bias"]
    pointers = set()
    for step in range(3):
        x = torch.randn(4, 12, requires_grad=True)
        x2 = x.detach().clone().requires_grad_()
        ours.zero_grad(set_to_none=True)
        theirs.zero_grad(set_to_none=True)
        for _ in range(2):  # two backwards accumulate
            ours(x).square().sum().backward()
            theirs(x2).square().sum().backward()
        torch.testing.assert_close(ours.weight.grad, theirs.weight.grad)
        torch.testing.assert_close(ours.bias.grad, theirs.bias.grad)
        torch.testing.assert_close(x.grad, x2.grad)
        pointers.add(ours.weight.grad.data_ptr())
    assert len(pointers) == 1  # one buffer, not fresh memory every step
    with torch.no_grad():
        torch.testing.assert_close(ours(torch.ones(2, 12)), theirs(torch.ones(2, 12)))


def test_resident_grad_linear_under_bf16_autocast_matches_autocast_linear() -> None:
    torch.manual_seed(0)
    ours, theirs = ResidentGradLinear(64, 32), nn.Linear(64, 32)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(16, 64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, ref = ours(x), theirs(x2)
    assert out.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref)
    out.float().square().sum().backward()
    ref.float().square().sum().backward()
    assert ours.weight.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    # ours computes the weight gradient in fp32, autocast's in bf16: equal to bf16 precision
    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(x.grad, x2.grad, rtol=2e-2, atol=2e-2)


def test_bf16_training_with_the_cached_lstm_matches_the_uncached_run() -> None:
    x, y = _tiny_data()
    cfg = TrainConfig(**{**PRESETS["paper"], "epochs": 2, "batch_size": 4, "precision": "bf16"})
    fits = []
    for cache in (True, False):
        head = _tiny_paper_head(1, freeze_rnn=True)
        fits.append(fit_head(head, x[:22], y[:22], x[22:], y[22:], cfg, seed=3, cache_frozen_rnn=cache))
    for a, b in zip(*(f.history for f in fits)):
        assert np.isfinite(a["train_loss"]) and a["train_loss"] == pytest.approx(b["train_loss"], rel=2e-2)
