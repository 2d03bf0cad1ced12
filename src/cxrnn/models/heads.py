"""Heads that read a backbone feature map as a sequence of H*W steps of C features.

``paper`` is the seed code's head exactly; ``bilstm`` (the training default, ``TrainConfig.head``),
``lstm`` and ``gru`` are trainable recurrent heads; ``pool`` is the no-RNN baseline that answers "does the
RNN help?".
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F


def _onednn_linear_works() -> bool:
    try:
        x, w = torch.ones(2, 3), torch.ones(4, 3)
        return bool(torch.equal(torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], ""), F.linear(x, w)))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


_ONEDNN_LINEAR: bool | None = None


def cpu_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` (x @ weight^T + bias) of fp32 CPU tensors through oneDNN where PyTorch has it, else F.linear.

    PyTorch runs F.linear on MKL's sgemm, which is slow at the paper head's batch-16 shapes on the CPUs
    measured: on 2 AMD EPYC cores, 25,088 -> 4,096 at 16 rows 47 ms (MKL) vs 32 ms (oneDNN), 4,096 -> 4,096
    27 vs 8 ms, and the input-gradient matmul (``cpu_linear(grad, weight.t())``) 53 vs 36 ms. oneDNN's
    ``_linear_pointwise`` is the op PyTorch's own compiler (inductor) emits for CPU linear layers.
    """
    if x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32 and x.dim() == 2 and _onednn_linear():
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def _onednn_linear() -> bool:
    global _ONEDNN_LINEAR
    if _ONEDNN_LINEAR is None:
        _ONEDNN_LINEAR = _onednn_linear_works()
    return _ONEDNN_LINEAR


def packed_for_cpu_linear(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """``weight`` reordered once into oneDNN's blocked layout for many ``cpu_linear`` calls at ``rows`` rows,
    or ``weight`` itself where ``cpu_linear`` would not use oneDNN.

    The LSTM multiplies its recurrent weight (16 MB for DenseNet121's 1,024 units) by a 16-row state at
    every one of 48 steps, forward and backward; oneDNN otherwise reorders the plain weight inside each call.
    Measured on 2 AMD EPYC cores, 48 steps of 16 x 1,024 @ 1,024 x 4,096: 63 -> 40 ms forward, and the
    backward's transposed product 56 -> 32 ms, for one 2.4 ms reorder each.
    """
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or weight.dim() != 2 or not _onednn_linear():
        return weight
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight, rows)
    except (AttributeError, RuntimeError, NotImplementedError):
        return weight


def cpu_linear_backend() -> str:
    """Which library ``cpu_linear`` runs fp32 CPU matmuls on in this process ("not used yet" before its first call)."""
    return {True: "oneDNN", False: "F.linear (MKL)", None: "not used yet"}[_ONEDNN_LINEAR]


def feature_map_to_sequence(fmap: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H*W, C), row-major like Keras' Reshape((H*W, C)) of an NHWC map."""
    return fmap.flatten(2).transpose(1, 2)


def _relu_lstm_steps(gates: torch.Tensor, w_rec: torch.Tensor, cells: torch.Tensor | None) -> torch.Tensor:
    """The recurrence of ``ReluLSTM`` in place: ``gates`` (B, T, 4n) holds each step's input projection and
    leaves with the pre-activations; returns the outputs (B, T, n). ``cells`` (B, T, n), when given,
    receives each step's cell state (what the backward pass needs)."""
    batch, steps, four_n = gates.shape
    n = four_n // 4
    outputs = gates.new_empty(batch, steps, n)
    w_rec = packed_for_cpu_linear(w_rec, batch) if steps > 2 else w_rec
    c = None  # the cell state is 0 before step 0
    for t in range(steps):
        gt = gates[:, t]
        if t:  # h is 0 at step 0: no recurrent matmul
            gt.add_(cpu_linear(outputs[:, t - 1], w_rec))
        # one sigmoid over all four gates (the candidate's share is unused): fewer small kernels
        sig = torch.sigmoid(gt)
        i, f, o = sig[:, :n], sig[:, n : 2 * n], sig[:, 3 * n :]
        g = torch.relu(gt[:, 2 * n : 3 * n])
        c = i * g if c is None else torch.addcmul(i * g, f, c)
        if cells is not None:
            cells[:, t] = c
        torch.mul(o, torch.relu(c), out=outputs[:, t])
    return outputs


class _ReluLSTMFn(torch.autograd.Function):
    """The recurrence with a hand-written backward through time.

    Autograd's own backward of the step loop computes the recurrent weight's gradient as one small matmul
    per step into a fresh tensor, added into the total (for the DenseNet121 paper head: 48 fresh 16 MB
    tensors per training step, profiled at most of the LSTM's backward). Here the steps' gate gradients are
    kept and the weight gradient is one (4n x B(T-1)) @ (B(T-1) x n) matmul at the end.
    """

    @staticmethod
    def forward(ctx, gates_x: torch.Tensor, w_rec: torch.Tensor) -> torch.Tensor:
        gates = gates_x.clone(memory_format=torch.contiguous_format)
        low_w = w_rec.to(gates.dtype)
        cells = gates.new_empty(gates.shape[0], gates.shape[1], w_rec.shape[1])
        outputs = _relu_lstm_steps(gates, low_w, cells)
        ctx.save_for_backward(gates, cells, outputs, low_w)
        ctx.weight_dtype = w_rec.dtype
        return outputs

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        gates, cells, outputs, w_rec = ctx.saved_tensors
        steps, n = gates.shape[1], w_rec.shape[1]
        grad_output = grad_output.to(gates.dtype)
        grad_gates = torch.empty_like(gates)
        grad_h = grad_c = None
        w_rec_t = packed_for_cpu_linear(w_rec.t(), gates.shape[0]) if steps > 2 else w_rec.t()
        for t in range(steps - 1, -1, -1):
            sig = torch.sigmoid(gates[:, t])
            i, f, o = sig[:, :n], sig[:, n : 2 * n], sig[:, 3 * n :]
            pre_g = gates[:, t, 2 * n : 3 * n]
            c = cells[:, t]
            dh = grad_output[:, t] if grad_h is None else grad_output[:, t] + grad_h
            dc = dh * o * (c > 0)
            if grad_c is not None:
                dc += grad_c
            d = grad_gates[:, t]
            # the gates through their sigmoid (s * (1 - s)), the candidate through its ReLU
            torch.mul(dc * torch.relu(pre_g), i * (1 - i), out=d[:, :n])
            if t:
                torch.mul(dc * cells[:, t - 1], f * (1 - f), out=d[:, n : 2 * n])
            else:
                d[:, n : 2 * n].zero_()  # c is 0 before step 0: the forget gate has no effect
            torch.mul(dc * i, pre_g > 0, out=d[:, 2 * n : 3 * n])
            torch.mul(dh * torch.relu(c), o * (1 - o), out=d[:, 3 * n :])
            if t:
                grad_c = dc * f
                grad_h = cpu_linear(d, w_rec_t)
        grad_w = None
        if ctx.needs_input_grad[1]:
            # the steps' h_{t-1} against their gate gradients, all steps in one matmul (h is 0 before step 0)
            later = grad_gates[:, 1:].reshape(-1, 4 * n)
            grad_w = (later.t() @ outputs[:, :-1].reshape(-1, n)).to(ctx.weight_dtype)
        return grad_gates, grad_w


class ReluLSTM(nn.Module):
    """Keras ``LSTM(activation="relu")``: sigmoid gates, ReLU for the candidate and the output.

    PyTorch's nn.LSTM has no activation option, and the paper's head depends on it.
    """

    def __init__(self, input_size: int, hidden_size: int):
        super().__init__()
        self.hidden_size = hidden_size
        self.input_proj = nn.Linear(input_size, 4 * hidden_size)
        self.recurrent = nn.Linear(hidden_size, 4 * hidden_size, bias=False)
        with torch.no_grad():
            # Keras' unit_forget_bias=True
            self.input_proj.bias.zero_()
            self.input_proj.bias[hidden_size : 2 * hidden_size] = 1.0

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        # All steps' input projections in one big matmul
        gates_x = self.input_proj(seq)
        w_rec = self.recurrent.weight
        if _tracing():
            return self._traceable(gates_x)
        if torch.is_grad_enabled() and (gates_x.requires_grad or w_rec.requires_grad):
            return _ReluLSTMFn.apply(gates_x, w_rec)
        gates = gates_x.contiguous()  # no autograd here: the fresh projection is overwritten in place
        return _relu_lstm_steps(gates, w_rec.to(gates.dtype), None)

    def _traceable(self, gates_x: torch.Tensor) -> torch.Tensor:
        """The same recurrence without in-place writes, for exporters and compilers (ONNX, torch.export)."""
        w_rec, n = self.recurrent.weight.t(), self.hidden_size
        outputs: list[torch.Tensor] = []
        c: torch.Tensor | None = None
        for t, gx in enumerate(gates_x.unbind(1)):
            gates = gx if t == 0 else torch.addmm(gx, outputs[-1], w_rec)
            sig = torch.sigmoid(gates)
            i, f, o = sig[:, :n], sig[:, n : 2 * n], sig[:, 3 * n :]
            g = torch.relu(gates[:, 2 * n : 3 * n])
            c = i * g if c is None else f * c + i * g
            outputs.append(o * torch.relu(c))
        return torch.stack(outputs, dim=1)


def _tracing() -> bool:
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling()


class _ResidentGradLinearFn(torch.autograd.Function):
    """``F.linear`` whose weight gradient is written into its layer's resident buffer (see ResidentGradLinear)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, layer: "ResidentGradLinear",
                low: torch.dtype | None):
        if low is not None:  # autocast: the matmul in ``low`` precision on the layer's resident copy of the weight
            weight = layer.low_precision_weight(low)
            out = F.linear(x.to(low), weight, None if bias is None else bias.to(low))
        else:
            out = cpu_linear(x, weight, bias)
        ctx.save_for_backward(x, weight)
        ctx.layer, ctx.has_bias = layer, bias is not None
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_x = cpu_linear(grad_out.to(weight.dtype), weight.t()).to(x.dtype) if ctx.needs_input_grad[0] else None
        if ctx.needs_input_grad[1]:
            # in fp32 also under autocast: with 16 rows this matmul's inner dimension is 16, where bf16 was
            # measured slower than fp32 (113 vs 74 ms for the 25,088 x 4,096 layer), and the master weight is fp32
            ctx.layer.accumulate_weight_grad(grad_out.float(), x.float())
        grad_bias = grad_out.float().sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, None, grad_bias, None, None


class ResidentGradLinear(nn.Linear):
    """nn.Linear (same parameters and state dict) whose weight gradient lives in one buffer reused every step.

    On the CPU a fresh 411 MB gradient (the paper head's 25,088 x 4,096 layer) is fresh pages, and the
    kernel faulting and zeroing them costs more than the matmul that fills them: measured 234 ms into a
    new tensor vs 74 ms into an existing one. ``zero_grad(set_to_none=True)`` drops ``weight.grad`` but not
    the buffer; the next backward writes the buffer (beta 0) and points ``weight.grad`` at it, and adds
    into ``weight.grad`` in place when one is already there (accumulation as PyTorch does it). Hence: a
    reference kept to an old ``weight.grad`` sees it overwritten by the next backward.

    Under autocast the same holds for the weight's low-precision copy: autocast would make a fresh one every
    forward; here it is copied into a resident buffer. Only 2-D inputs while training take this path;
    anything else (batched inputs, inference, a frozen weight) is plain nn.Linear.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._grad_buffer: torch.Tensor | None = None
        self._low_buffer: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or not torch.is_grad_enabled() or not self.weight.requires_grad:
            return super().forward(x)
        kind = x.device.type
        low = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None
        if low is None and x.dtype != self.weight.dtype:
            return super().forward(x)
        return _ResidentGradLinearFn.apply(x, self.weight, self.bias, self, low)

    @torch.no_grad()
    def low_precision_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight in ``dtype``, refreshed into the resident buffer (call once per forward)."""
        if self._low_buffer is None or self._low_buffer.dtype != dtype or self._low_buffer.shape != self.weight.shape:
            self._low_buffer = torch.empty(self.weight.shape, dtype=dtype, device=self.weight.device)
        return self._low_buffer.copy_(self.weight)

    @torch.no_grad()
    def accumulate_weight_grad(self, grad_out: torch.Tensor, x: torch.Tensor) -> None:
        """weight.grad += grad_out^T x, into the resident buffer when there is no gradient yet."""
        if self.weight.grad is not None:
            self.weight.grad.addmm_(grad_out.t(), x)
            return
        buffer = self._grad_buffer
        if buffer is None or buffer.shape != self.weight.shape or buffer.device != self.weight.device:
            buffer = self._grad_buffer = torch.empty_like(self.weight, memory_format=torch.contiguous_format)
        torch.mm(grad_out.t(), x, out=buffer)
        self.weight.grad = buffer

    def _apply(self, fn, recurse=True):
        self._grad_buffer = self._low_buffer = None  # .to() / .cuda(): the buffers would be on the old device
        return super()._apply(fn, recurse)


class PaperHead(nn.Module):
    """LSTM(relu, return_sequences) -> BN -> Flatten -> [Dense relu -> BN]* -> Dense (softmax outside)."""

    def __init__(
        self,
        in_channels: int,
        steps: int,
        num_classes: int,
        lstm_units: int = 512,
        dense: tuple[int, ...] | list[int] = (4096, 4096),
        freeze_rnn: bool = False,
    ):
        super().__init__()
        self.rnn = ReluLSTM(in_channels, lstm_units)
        if freeze_rnn:
            # The seed code built its LSTM with trainable=False: it stays at random init.
            self.rnn.requires_grad_(False)
        self.rnn_norm = nn.BatchNorm1d(lstm_units)
        layers: list[nn.Module] = []
        width = steps * lstm_units
        for units in dense:
            layers += [ResidentGradLinear(width, units), nn.ReLU(inplace=True), nn.BatchNorm1d(units)]
            width = units
        self.dense = nn.Sequential(*layers)
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        return self.from_rnn_outputs(self.rnn_outputs(fmap))

    @property
    def rnn_frozen(self) -> bool:
        """The LSTM is fixed (``freeze_rnn``): its outputs are a fixed function of the feature map."""
        return not any(p.requires_grad for p in self.rnn.parameters())

    def rnn_outputs(self, fmap: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> the LSTM's (B, H*W, units) outputs: what a frozen LSTM lets training cache."""
        return self.rnn(feature_map_to_sequence(fmap))

    def from_rnn_outputs(self, seq: torch.Tensor) -> torch.Tensor:
        """The trainable rest of the head (BN, dense layers, classifier) on the LSTM's outputs."""
        seq = self.rnn_norm(seq.transpose(1, 2)).transpose(1, 2)  # Keras BN normalises the last axis
        return self.classifier(self.dense(seq.flatten(1)))


class RecurrentHead(nn.Module):
    """A trainable LSTM / GRU / bidirectional LSTM over the H*W steps, summarised by its outputs' mean and max.

    The summary matters for explanations. With the last output in the summary (``last_mean``, cxrnn
    <= 0.1's only choice), a unidirectional LSTM routes most of the class-score gradient to the last
    raster steps (the bottom rows of the image), and Grad-CAM points there whatever the lesion; mean
    and max over all steps give every position a direct gradient path. Measured on the phantom
    (efficientnet_lite0, Grad-CAM at bn2, pointing game on an unseen seed): lstm last_mean 0.23,
    lstm mean_max 0.41, bilstm mean_max 0.65 (the pool head, plain CAM, 0.55), at equal accuracy.

    Each step's C features are first projected to ``proj`` dimensions: the recurrence then costs
    ~proj^2 per step instead of C*hidden (C is 1280-2048), which keeps CPU training fast without
    losing accuracy on cached features.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        kind: str = "lstm",
        hidden: int = 128,
        proj: int = 128,
        dense: int = 64,
        dropout: float = 0.3,
        summary: str = "mean_max",
    ):
        super().__init__()
        if summary not in SUMMARIES:
            raise ValueError(f"unknown summary {summary!r}: use one of {', '.join(SUMMARIES)}")
        self.summary = summary
        self.bidirectional = kind == "bilstm"
        self.project = nn.Sequential(nn.LayerNorm(in_channels), nn.Linear(in_channels, proj), nn.GELU(),
                                     nn.Dropout(dropout))
        rnn_cls = nn.GRU if kind == "gru" else nn.LSTM
        self.rnn = rnn_cls(proj, hidden, batch_first=True, bidirectional=(kind == "bilstm"))
        out = hidden * (2 if kind == "bilstm" else 1)
        parts = 1 if summary == "mean" else 2
        self.classifier = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(parts * out, dense),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(dense, num_classes),
        )

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        outputs, _ = self.rnn(self.project(feature_map_to_sequence(fmap)))
        if self.summary == "last_mean":
            summary = torch.cat([outputs[:, -1], outputs.mean(dim=1)], dim=1)
        elif self.summary == "mean_max":
            summary = torch.cat([outputs.mean(dim=1), outputs.amax(dim=1)], dim=1)
        else:
            summary = outputs.mean(dim=1)
        return self.classifier(summary)


class PoolHead(nn.Module):
    """Global average pool + linear: the no-RNN baseline."""

    def __init__(self, in_channels: int, num_classes: int, dropout: float = 0.3):
        super().__init__()
        self.norm = nn.LayerNorm(in_channels)
        self.drop = nn.Dropout(dropout)
        self.classifier = nn.Linear(in_channels, num_classes)

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.drop(self.norm(fmap.mean(dim=(2, 3)))))


SUMMARIES = ("last_mean", "mean_max", "mean")
HEADS = ("lstm", "gru", "bilstm", "pool", "paper")


def create_head(
    name: str, in_channels: int, steps: int, num_classes: int, **options: Any
) -> nn.Module:
    """Build a head by name; ``options`` are the head's own keyword arguments (stored with the model)."""
    if name == "paper":
        return PaperHead(in_channels, steps, num_classes, **options)
    if name in ("lstm", "gru", "bilstm"):
        return RecurrentHead(in_channels, num_classes, kind=name, **options)
    if name == "pool":
        return PoolHead(in_channels, num_classes, **options)
    raise ValueError(f"unknown head {name!r}: use one of {', '.join(HEADS)}")
