"""The optimizers training builds, each as few passes over the parameters' memory as the hardware allows.

The paper head's dense layers are 120-230 M parameters at batch 16, so on a CPU its optimizer step is a
stream through about 2 GB of parameters, gradients and running averages: the number of passes over that
memory, not arithmetic, sets its cost.
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch

from cxrnn.training.config import TrainConfig


def make_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    """``params``: parameters, or param-group dicts (a group's ``lr_scale`` multiplies the schedule's lr)."""
    params = list(params)
    if params and isinstance(params[0], dict):
        params = [{**g, "params": [p for p in g["params"] if p.requires_grad]} for g in params]
        for g in params:
            g.setdefault("lr_scale", 1.0)
            g["lr"] = cfg.lr * g["lr_scale"]
    else:
        params = [p for p in params if p.requires_grad]
    # fused=True: one pass over each parameter's memory per step instead of one per elementwise op
    # (PyTorch has fused CPU kernels for Adam, AdamW and SGD; measured on the VGG19 paper head, 122 M
    # parameters: AdamW 1.24 s per-tensor, 0.75 s foreach, 0.10 s fused).
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    if cfg.optimizer == "rmsprop":
        # Keras RMSprop defaults: rho 0.9, eps 1e-7 (PyTorch's alpha is Keras' rho)
        return ChunkedRMSprop(params, lr=cfg.lr, alpha=0.9, eps=1e-7, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay, fused=True)


def _rmsprop_update(param: torch.Tensor, grad: torch.Tensor, square_avg: torch.Tensor, decay: torch.Tensor,
                    alpha: torch.Tensor, one_minus_alpha: torch.Tensor, eps: torch.Tensor, neg_lr: torch.Tensor) -> None:
    # ATen's operations in its order. The results can differ from torch.optim.RMSprop's by an ulp: ATen's
    # add(alpha=) and addcmul_ round once (fused multiply-adds), inductor's loop rounds the product too, and
    # the compiled sqrt is correctly rounded while ATen's vectorised float sqrt is not (measured: 80 % of
    # its results on uniform [0, 1) inputs equal the rounded exact root). Matching those roundings through
    # float64 was measured at twice the time (84 vs 40 ms on 103 M parameters).
    grad = grad + decay * param  # decay 0: grad itself
    square_avg.mul_(alpha).add_(one_minus_alpha * grad * grad)
    param.add_(neg_lr * grad / square_avg.sqrt().add_(eps))


_FUSED_UPDATE: Callable[..., None] | None = None
_FUSED_STATE = "untried"  # "untried" | "ok" | the reason it is not used


def fused_rmsprop_update() -> Callable[..., None] | None:
    """The RMSprop update compiled into one loop (PyTorch's inductor), or None where it cannot be built.

    It reads the parameter, its gradient and running average once and writes the two back: one pass over
    20 bytes per parameter. Measured on 2 AMD EPYC cores, the 25,088 x 4,096 layer (103 M parameters):
    40 ms vs 99 ms for the chunked eager update. Built once per process (about 30 s the first time,
    seconds when inductor's on-disk cache has it) and checked against the eager update on a probe;
    a machine without a C++ compiler, or any failure, falls back to the chunked update with one warning.
    """
    global _FUSED_UPDATE, _FUSED_STATE
    if _FUSED_STATE == "untried":
        try:
            update = torch.compile(_rmsprop_update, dynamic=True, fullgraph=True)
            probe = [torch.linspace(-1.0, 1.0, 1000) for _ in range(3)]
            probe[2] = probe[2].abs()
            expected = [t.clone() for t in probe]
            scalars = [torch.tensor(v, dtype=torch.float32) for v in (1e-2, 0.9, 1 - 0.9, 1e-7, -1e-3)]
            update(*probe, *scalars)
            _rmsprop_update(*expected, *scalars)
            if not all(torch.allclose(a, b, rtol=1e-6, atol=1e-7) for a, b in zip(probe, expected)):
                raise RuntimeError("the compiled update differs from the eager one on a probe")
            _FUSED_UPDATE, _FUSED_STATE = update, "ok"
        except Exception as error:  # noqa: BLE001 - any compiler failure means: use the eager update
            _FUSED_STATE = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            warnings.warn(f"the compiled RMSprop update is not available ({_FUSED_STATE}); "
                          "using the chunked eager update", RuntimeWarning, stacklevel=2)
    return _FUSED_UPDATE


def rmsprop_backend() -> str:
    """How ``ChunkedRMSprop`` updates large parameters in this process (after its first step)."""
    if _FUSED_STATE == "ok":
        return "compiled one pass"
    return "not used yet" if _FUSED_STATE == "untried" else f"chunked eager ({_FUSED_STATE})"


class ChunkedRMSprop(torch.optim.RMSprop):
    """PyTorch's RMSprop update, the same elementwise ops in the same order, in as few passes over memory
    as this machine allows.

    PyTorch has no fused RMSprop, and on the CPU ``foreach`` runs the same per-op loops: each of the
    update's five elementwise ops streams the whole parameter through memory (a 25,088 x 4,096 dense
    weight is 411 MB). Two faster ways, both the same arithmetic:

    - large parameters (``FUSED_MIN_ELEMENTS`` and up): the update compiled into one loop
      (``fused_rmsprop_update``), where PyTorch's compiler works;
    - the rest, and everywhere as the fallback: chunk by chunk (``CHUNK`` elements), so that the later ops
      find their operands in cache and each parameter, its gradient and its running average cross memory
      about once. Measured on the VGG19 paper head's 122 M parameters, one thread: 0.42 s per step with
      torch.optim.RMSprop (foreach was no faster than the per-tensor loop), 0.15 s chunked.

    Only the plain variant (no momentum, not centered) on the CPU takes these paths; the others fall back
    to PyTorch's own step.
    """

    # elements: four 1 MB operands stay in cache between the ops (measured on 122 M elements: 64 Ki 0.18 s,
    # 128 Ki 0.13 s, 256 Ki 0.11 s, 1 Mi 0.11 s; one pass, unchunked, 0.25 s)
    CHUNK = 1 << 18
    # a compiled call costs its guards (tens of microseconds) and the first one a compile: worth it only
    # where the tensor streams from main memory (16 MB and up), which keeps small heads off the compiler
    FUSED_MIN_ELEMENTS = 1 << 22

    def __init__(self, params, lr: float, alpha: float, eps: float, weight_decay: float = 0.0):
        super().__init__(params, lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, foreach=False)
        self._scratch = torch.empty(0)

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        if any(g["momentum"] or g["centered"] or g["maximize"] or any(p.device.type != "cpu" for p in g["params"])
               for g in self.param_groups):
            return super().step(closure)  # on a GPU PyTorch's foreach kernels are the fast path
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, alpha, eps, decay = group["lr"], group["alpha"], group["eps"], group["weight_decay"]
            scalars = None
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("RMSprop does not support sparse gradients")
                state = self.state[p]
                if not state:  # the same state as torch.optim.RMSprop: its state dicts load either way
                    state["step"] = torch.tensor(0.0)
                    state["square_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                square_avg = state["square_avg"]
                fused = self._fused_for(p, p.grad, square_avg)
                if fused is not None:
                    if scalars is None:  # tensors, so that the schedule's new lr each epoch is no recompile
                        scalars = [torch.tensor(v, dtype=torch.float32) for v in (decay, alpha, 1 - alpha, eps, -lr)]
                    fused(p.view(-1), p.grad.view(-1), square_avg.view(-1), *scalars)
                else:
                    self._update(p, p.grad, square_avg, lr, alpha, eps, decay)
        return loss

    def _fused_for(self, *tensors: torch.Tensor) -> Callable[..., None] | None:
        if tensors[0].numel() < self.FUSED_MIN_ELEMENTS or tensors[0].dtype != torch.float32:
            return None
        if not all(t.is_contiguous() for t in tensors):
            return None
        return fused_rmsprop_update()

    def _update(self, param: torch.Tensor, grad: torch.Tensor, square_avg: torch.Tensor, lr: float, alpha: float,
                eps: float, decay: float) -> None:
        if not (param.is_contiguous() and grad.is_contiguous() and square_avg.is_contiguous()):
            chunks = [(param, grad, square_avg)]
        else:
            p, g, s = param.view(-1), grad.view(-1), square_avg.view(-1)
            chunks = [(p[i : i + self.CHUNK], g[i : i + self.CHUNK], s[i : i + self.CHUNK])
                      for i in range(0, p.numel(), self.CHUNK)]
        for p, g, s in chunks:
            if decay:
                g = g.add(p, alpha=decay)
            s.mul_(alpha).addcmul_(g, g, value=1 - alpha)
            avg = torch.sqrt(s, out=self._buffer(s)).add_(eps)
            p.addcdiv_(g, avg, value=-lr)

    def _buffer(self, like: torch.Tensor) -> torch.Tensor:
        """A reused scratch tensor for sqrt(square_avg) + eps: a fresh one per chunk would be an allocation
        (and, for large tensors, fresh pages) per chunk."""
        if self._scratch.numel() < like.numel() or self._scratch.dtype != like.dtype or self._scratch.device != like.device:
            self._scratch = torch.empty(like.numel(), dtype=like.dtype, device=like.device)
        return self._scratch[: like.numel()].view_as(like)
