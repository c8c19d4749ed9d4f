"""The GEMMs of a linear layer on CPU, each in whichever of PyTorch's two libraries (MKL, the
default, or oneDNN) is faster for it on this machine.

At the paper's size a training step is dominated by the 64 × 50,257 output head, and which library
runs its products faster depends on the CPU: on the AMD EPYC (Zen 4) of our first machines MKL ran
both at half speed (``x @ Wᵀ`` 6.5–8 ms against oneDNN's 3.5–4.3, the input gradient ``dY @ W``
3.9–4.6 against 2.2); on the Intel Xeon of later ones MKL is the faster for ``x @ Wᵀ`` (2.6 vs
3.0 ms) and oneDNN for ``dY @ W`` (1.4 vs 2.0); at 8,192 × 768 → 3,072 MKL is faster both ways
there (2 threads; ``scripts/bench_gemm.py``). So each large product is timed once per machine in
both libraries at its first use and the faster one kept (``BASIS_ONEDNN=auto``, the default); the
choice is stored in the user cache (``data.cache.cache_dir()/gemm``), keyed by CPU, PyTorch
version, thread count, shape and direction, so every later process on the machine — a resumed
run, a sweep's other jobs — makes the same choice and stays bit-identical. ``BASIS_ONEDNN=1``
sends every large product to oneDNN, ``BASIS_ONEDNN=0`` none.

oneDNN is reached through the operator Inductor uses for CPU linears,
``torch.ops.mkldnn._linear_pointwise``. That operator is private, so it is used only after a
self-check at first use against ``F.linear``; if it is missing, fails or disagrees, everything
runs through ``F.linear`` as before. Results agree with MKL's to fp32 rounding (~1e-6 relative),
not bit for bit. Products below ``MIN_MACS`` multiply-adds always stay in MKL: oneDNN's ~10 µs
per call costs more than it could save.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# 64 × 64 × 256 (the paper's MLP, 1 M) is slower through oneDNN; 64 × 64 × 50,257 (206 M) and
# 1,024 × 768 × 3,072 are faster (scripts/bench_gemm.py).
MIN_MACS = 1 << 22

_state: dict[str, bool | None] = {"ok": None}  # None: not checked yet
_choices: dict[tuple[str, int, int, int, int], bool] = {}  # (direction, rows, N, M, threads)
_MODES = ("auto", "1", "0")


def _op():
    return getattr(torch.ops.mkldnn, "_linear_pointwise", None)


def _mode() -> str:
    mode = os.environ.get("BASIS_ONEDNN", "auto")
    if mode not in _MODES:
        raise ValueError(f"BASIS_ONEDNN must be one of {', '.join(_MODES)}; got {mode!r}")
    return mode


def onednn_available() -> bool:
    """Whether the oneDNN route is enabled here and passed its self-check (done once)."""
    if _mode() == "0":
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


def use_onednn(x: torch.Tensor, weight: torch.Tensor, direction: str = "forward") -> bool:
    """Whether oneDNN runs this product of a linear layer with ``weight`` (M, N): ``x @ weight.T``
    for ``direction="forward"`` (x: (..., N)), ``x @ weight`` for ``"input_grad"`` (x = dY:
    (..., M)). Only large fp32 CPU products, and only where oneDNN is the faster library here."""
    return _large_fp32_cpu(x, weight) and _faster_here(x, weight, direction)


def onednn_routes(x: torch.Tensor, weight: torch.Tensor) -> tuple[bool, bool]:
    """``use_onednn`` for both products of a layer with input ``x``, the shared checks done once
    (the input gradient's choice needs only the row count, the same for x and dY)."""
    if not _large_fp32_cpu(x, weight):
        return False, False
    return _faster_here(x, weight, "forward"), _faster_here(x, weight, "input_grad")


def _large_fp32_cpu(x: torch.Tensor, weight: torch.Tensor) -> bool:
    # The size first: every small layer of every step asks, and most stop there.
    return (
        x.dim() >= 1
        and x.numel() // max(x.shape[-1], 1) * weight.numel() >= MIN_MACS  # rows · M · N
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
        and onednn_available()
    )


def _faster_here(x: torch.Tensor, weight: torch.Tensor, direction: str) -> bool:
    if _mode() == "1":
        return True
    rows = x.numel() // x.shape[-1]
    key = (direction, rows, weight.shape[1], weight.shape[0], torch.get_num_threads())
    choice = _choices.get(key)
    if choice is None:
        choice = _choices[key] = _stored_choice(key)
    return choice


def _stored_choice(key: tuple[str, int, int, int, int]) -> bool:
    """The faster library for ``key`` on this machine: read from the cache, or measured now and
    stored there (the first process to store a choice wins; the others read and use it)."""
    from data.cache import cache_dir  # lazy: a light import for the library

    from .native import cpu_signature

    direction, rows, n_in, n_out, threads = key
    machine = hashlib.sha256(cpu_signature() + torch.__version__.encode()).hexdigest()[:12]
    path = cache_dir() / "gemm" / f"{machine}-{direction}-{rows}x{n_in}x{n_out}-t{threads}"
    stored = _read_choice(path)
    if stored is None:  # not measured on this machine yet, or the file is damaged (replaced)
        measured = "onednn" if _onednn_is_faster(*key[:4]) else "mkl"
        _store_first(path, measured, replace=path.exists())
        stored = _read_choice(path) or measured  # another process's, if it stored one first
    return stored == "onednn"


def _read_choice(path: Path) -> str | None:
    try:
        stored = path.read_text().strip()
    except OSError:
        return None
    return stored if stored in ("onednn", "mkl") else None


def _store_first(path: Path, choice: str, replace: bool = False) -> None:
    """Write ``choice`` to ``path`` whole (staged, then linked or renamed into place); unless
    ``replace``, a file already there is kept: os.link refuses to overwrite, so of two processes
    deciding at once the first one's choice stands and the other reads it."""
    staged = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        staged.write_text(choice + "\n")
        try:
            if replace:
                os.replace(staged, path)
            else:
                os.link(staged, path)
        except FileExistsError:
            pass
        except OSError:  # a filesystem without hard links
            os.replace(staged, path)
    except OSError:  # a read-only cache: the choice holds for this process only
        pass
    finally:
        staged.unlink(missing_ok=True)


def _onednn_is_faster(direction: str, rows: int, n_in: int, n_out: int) -> bool:
    """Time both libraries on random operands of this shape (best of 3 after a warm-up call each,
    in alternation); oneDNN must be 3 % faster to be chosen, so near-ties keep PyTorch's default."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(n_out, n_in, generator=gen)
    if direction == "forward":
        x = torch.randn(rows, n_in, generator=gen)
        runs = (lambda: F.linear(x, weight), lambda: _op()(x, weight, None, "none", [], ""))
    else:
        dy = torch.randn(rows, n_out, generator=gen)
        runs = (lambda: dy @ weight, lambda: _op()(dy, weight.t(), None, "none", [], ""))
    best = [float("inf"), float("inf")]
    with torch.no_grad():
        for i in range(4):
            for lib, run in enumerate(runs):
                t0 = time.perf_counter()
                run()
                if i:  # the first call of each warms up
                    best[lib] = min(best[lib], time.perf_counter() - t0)
    return best[1] < 0.97 * best[0]


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` computed by the faster library; no autograd of its own."""
    if use_onednn(x, weight):
        return _op()(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def input_grad(dy: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``dy @ weight``, the input gradient of a linear layer, by the faster library."""
    if use_onednn(dy, weight, "input_grad"):
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
    """``F.linear`` with the same autograd, its large CPU products each run by the faster
    library (``onednn_routes``)."""
    if not any(onednn_routes(x, weight)):
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
