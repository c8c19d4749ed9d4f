"""The GEMMs of a linear layer on CPU, through oneDNN where it beats PyTorch's default (MKL).

At the paper's size a training step is dominated by the 64 × 50,257 output head, and on the AMD
EPYC (Zen 4) CPU of our machines MKL runs its two large products at half speed: ``x @ Wᵀ`` takes
6.5–8 ms where oneDNN takes 3.5–4.3 ms, and the input gradient ``dY @ W`` 3.9–4.6 ms against 2.2
(2 threads; ``scripts/bench_gemm.py`` measures both on the machine at hand). oneDNN is PyTorch's
own bundled library, reached through the operator Inductor uses for CPU linears,
``torch.ops.mkldnn._linear_pointwise``. That operator is private, so it is used only after a
self-check at first use against ``F.linear``; if it is missing, fails or disagrees, everything
runs through ``F.linear`` as before. Results agree with MKL's to fp32 rounding (~1e-6 relative),
not bit for bit.

Only large fp32 CPU products take this route: below ``MIN_MACS`` multiply-adds oneDNN's ~10 µs
per call costs more than it saves. ``BASIS_ONEDNN=0`` in the environment turns it off.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

# 64 × 64 × 256 (the paper's MLP, 1 M) is slower through oneDNN; 64 × 64 × 50,257 (206 M) and
# 1,024 × 768 × 3,072 are faster (scripts/bench_gemm.py).
MIN_MACS = 1 << 22

_state: dict[str, bool | None] = {"ok": None}  # None: not checked yet


def _op():
    return getattr(torch.ops.mkldnn, "_linear_pointwise", None)


def onednn_available() -> bool:
    """Whether the oneDNN route is enabled here and passed its self-check (done once)."""
    if os.environ.get("BASIS_ONEDNN", "1") == "0":
        return False
    if _state["ok"] is None:
        _state["ok"] = _self_check()
    return bool(_state["ok"])


def _self_check() -> bool:
    if not torch.backends.mkldnn.is_available() or _op() is None:
        return False
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 24, generator=gen)
    w = torch.randn(40, 24, generator=gen)
    b = torch.randn(40, generator=gen)
    dy = torch.randn(2, 5, 40, generator=gen)
    try:
        with torch.no_grad():
            ok = torch.allclose(_op()(x, w, b, "none", [], ""), F.linear(x, w, b), atol=1e-4)
            ok = ok and torch.allclose(_op()(dy, w.t(), None, "none", [], ""), dy @ w, atol=1e-4)
    except Exception:  # the private operator changed or is broken: stay on F.linear
        return False
    return bool(ok)


def use_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``x @ weight.T`` (or ``x @ weight``) is a large fp32 CPU product oneDNN should run."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and x.dim() >= 1
        and x.numel() // max(x.shape[-1], 1) * weight.numel() >= MIN_MACS  # rows · M · N
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
        and onednn_available()
    )


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` computed by the faster library; no autograd of its own."""
    if use_onednn(x, weight):
        return _op()(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def input_grad(dy: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``dy @ weight``, the input gradient of a linear layer, by the faster library."""
    if use_onednn(dy, weight):
        return _op()(dy, weight.t(), None, "none", [], "")
    return dy @ weight


class _LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return linear(x, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = input_grad(dy, weight)
        dy_rows = dy.reshape(-1, dy.shape[-1])
        if ctx.needs_input_grad[1]:
            dw = dy_rows.t() @ x.reshape(-1, x.shape[-1])  # MKL is the faster one here
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy_rows.sum(0)
        return dx, dw, db


def fast_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``F.linear`` with the same autograd, its large CPU products run by oneDNN."""
    if not use_onednn(x, weight):
        return F.linear(x, weight, bias)
    if torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    ):
        return _LinearFn.apply(x, weight, bias)
    return linear(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, names and state dict) whose forward is ``fast_linear``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fast_linear(x, self.weight, self.bias)
