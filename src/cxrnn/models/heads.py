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


def feature_map_to_sequence(fmap: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H*W, C), row-major like Keras' Reshape((H*W, C)) of an NHWC map."""
    return fmap.flatten(2).transpose(1, 2)


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
        # All steps' input projections in one big matmul, split with unbind: indexing gates_x[:, t] instead
        # makes the backward of every time step add a full-size zero gradient of gates_x (profiled: about
        # a quarter of the VGG19 paper head's training step).
        gates_x = self.input_proj(seq).unbind(1)
        w_rec, n = self.recurrent.weight.t(), self.hidden_size
        outputs: list[torch.Tensor] = []
        c: torch.Tensor | None = None  # the cell state is 0 before step 0
        for t, gx in enumerate(gates_x):
            # h is 0 at step 0: no recurrent matmul; later the add is fused into it (addmm)
            gates = gx if t == 0 else torch.addmm(gx, outputs[-1], w_rec)
            # One sigmoid over all four gates (the candidate's share is unused): fewer small kernels
            sig = torch.sigmoid(gates)
            i, f, o = sig[:, :n], sig[:, n : 2 * n], sig[:, 3 * n :]
            g = torch.relu(gates[:, 2 * n : 3 * n])
            c = i * g if c is None else f * c + i * g
            outputs.append(o * torch.relu(c))
        return torch.stack(outputs, dim=1)


class _ResidentGradLinearFn(torch.autograd.Function):
    """``F.linear`` whose weight gradient is written into its layer's resident buffer (see ResidentGradLinear)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, layer: "ResidentGradLinear",
                low: torch.dtype | None):
        if low is not None:  # autocast: the matmul in ``low`` precision on the layer's resident copy of the weight
            weight = layer.low_precision_weight(low)
            out = F.linear(x.to(low), weight, None if bias is None else bias.to(low))
        else:
            out = F.linear(x, weight, bias)
        ctx.save_for_backward(x, weight)
        ctx.layer, ctx.has_bias = layer, bias is not None
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_x = (grad_out.to(weight.dtype) @ weight).to(x.dtype) if ctx.needs_input_grad[0] else None
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
