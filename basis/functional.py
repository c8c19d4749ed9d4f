"""``basis_linear``: a linear map with exact dX and a count-sketched dW (the paper's Algorithm 1).

Read side by side with ``BASIS-SPEC.md`` §1. PyTorch layout: ``weight`` is (M, N) and
``y = x @ weight.T + bias``, so the estimated weight gradient is ``dŶᵀ X̂`` rather than ``X̂ᵀ dŶ``.
``_BasisLinearFn`` is the reference; for fp32 CPU tensors the same steps run as one compiled
operator (``csrc/sketched_linear.cpp``, via ``native.py``) whose results equal it bit for bit.
"""

from __future__ import annotations

import math

import torch

from . import gemm, native
from .sketch import HASHINGS, Sketch, draw_sketch, scalar_from_squares

_SEED_BOUND = 2**62
# A sketched dY up to this many elements is scaled by the kernel as it is made (R = 32, M = 256:
# 8,192); a larger one (the head's R × 50,257) leaves the scaling to the smaller X̂.
_SCALE_IN_SKETCH_MAX = 1 << 15


def check_settings(
    rank: int, lam: float, scale: float, eps: float, invariant_scalars: bool, hashing: str
) -> None:
    """Raise ``ValueError`` naming the first bad setting (shared with ``BasisLinear``)."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    if not isinstance(lam, (int, float)) or not 0.0 <= lam < 1.0:
        raise ValueError(f"lam (latent shrinkage λ) must be in [0, 1), got {lam!r}")
    if not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    if not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"eps must be a positive number, got {eps!r}")
    if not isinstance(invariant_scalars, bool):
        raise ValueError(f"invariant_scalars must be True or False, got {invariant_scalars!r}")
    if hashing not in HASHINGS:
        raise ValueError(f"hashing must be one of {', '.join(HASHINGS)}; got {hashing!r}")


def _check_given_sketch(
    h: torch.Tensor | None, s: torch.Tensor | None, rows: int, r_eff: int, hashing: str
) -> None:
    if h is None and s is None:
        return
    if h is None or s is None:
        raise ValueError("h and s must be given together (or neither)")
    if hashing == "gaussian":
        raise ValueError(
            "h and s define a count sketch; they cannot be used with hashing='gaussian'"
        )
    if h.shape != (rows,) or h.dtype.is_floating_point or h.dtype == torch.bool:
        raise ValueError(
            f"h must be an integer tensor of shape ({rows},), got {h.dtype} {tuple(h.shape)}"
        )
    if rows and (int(h.min()) < 0 or int(h.max()) >= r_eff):
        raise ValueError(f"h must hold bin ids in [0, {r_eff}) (R_eff = min(rank, rows))")
    if s.shape != (rows,):
        raise ValueError(f"s must have shape ({rows},), got {tuple(s.shape)}")
    if not bool(((s == 1) | (s == -1)).all()):
        raise ValueError("s must hold only +1 and -1")


class _BasisLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, settings):
        # One tuple instead of nine arguments: autograd inspects every argument of every call.
        rank, lam, scale, eps, invariant_scalars, hashing, seed, h, s = settings
        # Step 1: the forward output is the exact linear map (bias outside the sketched product).
        y = gemm.linear(x, weight, bias)

        rows = x.reshape(-1, x.shape[-1]).float()  # norms and sums in fp32, whatever x's dtype
        # Step 5: X̃ = S X, a signed segment sum into R_eff bins.
        # Step 6: γ_X = ‖X‖_F / (‖X̃‖_F + ε); X̂ = γ_X X̃ keeps the activations' energy.
        x_hat, _, _ = _sketch_rows(
            rows, rank, hashing, seed, h, s, eps, invariant_scalars, mult=1.0
        )

        # Step 7: keep X̂ (R_eff × N), W (the parameter itself, no copy) and h, s — or only the
        # seed that regenerates them, so nothing of X's size (B × N) outlives the forward.
        if h is not None:
            ctx.save_for_backward(x_hat, weight, h, s)
        else:
            ctx.save_for_backward(x_hat, weight)
        ctx.settings = (rank, lam, scale, eps, invariant_scalars, hashing, seed)
        ctx.x_dtype = x.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        x_hat, weight, *given = ctx.saved_tensors
        rank, lam, scale, eps, invariant_scalars, hashing, seed = ctx.settings
        dx = dw = db = None
        dy_rows = dy.reshape(-1, dy.shape[-1])

        # Step 1: dX = dY W, exact — error propagation is never approximated.
        if ctx.needs_input_grad[0]:
            dx = gemm.input_grad(dy, weight.to(dy.dtype)).to(ctx.x_dtype)
        want_db = ctx.bias_dtype is not None and ctx.needs_input_grad[2]
        if ctx.needs_input_grad[1]:
            h, s = given if given else (None, None)
            # Step 2: dỸ = S dY with the same h and s as the forward; γ_dY rescales its norm.
            # Step 3 and 4 folded into one scalar: (1−λ) on X̂ and on dŶ, times `scale`. It
            # multiplies the smaller of dŶ (R × M, 50,257 wide at the head) and X̂ (R × N); a small
            # dŶ is scaled by the kernel that makes it, which also sums dY's columns for db.
            coef = scale * (1.0 - lam) ** 2
            in_sketch = coef != 0.0 and (
                len(x_hat) * dy_rows.shape[1] <= max(x_hat.numel(), _SCALE_IN_SKETCH_MAX)
            )
            dy_hat, gamma_dy, db = _sketch_rows(
                dy_rows.float(), rank, hashing, seed, h, s, eps, invariant_scalars,
                mult=coef if in_sketch else None, colsum=want_db,
            )  # fmt: skip
            if not in_sketch:
                x_hat = x_hat * (gamma_dy * coef)
            # (M, N) = dŶᵀ X̂, the transpose of the paper's X̂ᵀ dŶ; at R = 1 an outer product,
            # since a GEMM with inner dimension 1 costs as much as the exact one.
            dw = torch.outer(dy_hat[0], x_hat[0]) if len(x_hat) == 1 else dy_hat.t() @ x_hat
            dw = dw.to(weight.dtype)
        if want_db:
            db = (dy_rows.sum(0, dtype=torch.float32) if db is None else db).to(ctx.bias_dtype)
        return dx, dw, db, None


def _sketch_rows(
    rows: torch.Tensor,
    rank: int,
    hashing: str,
    seed: int | None,
    h: torch.Tensor | None,
    s: torch.Tensor | None,
    eps: float,
    invariant_scalars: bool,
    *,
    mult: float | None = None,
    colsum: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | float, torch.Tensor | None]:
    """``(S rows, γ, column sums of rows or None)`` for the sketch given by (h, s) or drawn from the
    seed, identically in forward and backward; γ = 1 without invariant scalars. With ``mult``
    the sketch comes back already multiplied by ``mult · γ``. A seeded count sketch of fp32 CPU
    rows is drawn, applied, scaled and column-summed in one compiled call: at the paper's size
    each call costs more than its arithmetic."""
    r_eff = min(rank, rows.shape[0])
    if h is None and hashing != "gaussian" and mult != 0.0:  # the kernel reads mult 0 as "none"
        fused = native.seeded_count_sketch(
            rows, r_eff, hashing == "balanced", seed,
            colsum=colsum, mult=mult or 0.0, invariant=invariant_scalars, eps=eps,
        )  # fmt: skip
        if fused is not None:
            out, sq_rows, sq_out, sums = fused
            return (
                out,
                scalar_from_squares(sq_rows, sq_out, eps) if invariant_scalars else 1.0,
                sums,
            )
    if h is not None:
        sketch = Sketch(rank=r_eff, h=h.to(device=rows.device, dtype=torch.long), s=s.float())
    else:
        sketch = draw_sketch(rows.shape[0], rank, hashing, seed, rows.device)
    if invariant_scalars:
        out, gamma = sketch.apply_with_gamma(rows, eps)
    else:
        out, gamma = sketch.apply(rows), 1.0
    if mult is not None:
        out.mul_(gamma * mult)
    return out, gamma, rows.sum(0, dtype=torch.float32) if colsum else None


def basis_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    rank: int,
    lam: float = 0.0,
    scale: float = 1.0,
    eps: float = 1e-8,
    invariant_scalars: bool = True,
    hashing: str = "balanced",
    generator: torch.Generator | None = None,
    seed: int | None = None,
    h: torch.Tensor | None = None,
    s: torch.Tensor | None = None,
) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` whose backward estimates dW from a rank-``rank`` sketch.

    ``x``: (..., N); ``weight``: (M, N); ``bias``: (M,) or None; returns (..., M). All leading
    dims of ``x`` are the B rows that are hashed into ``R_eff = min(rank, B)`` bins. dX and the
    bias gradient are exact; the weight gradient is
    ``scale · (1−λ)² · γ_X γ_dY · (S dY)ᵀ (S X)`` (γ = 1 without invariant scalars).

    ``h`` (bin ids) and ``s`` (±1 signs) fix the sketch; otherwise it is drawn from ``seed`` (an
    integer in [0, 2⁶⁴)), or from a seed drawn from ``generator`` (torch's default generator when
    both are None), and regenerated in backward from that one saved seed.
    Without autograd (no_grad, inference, frozen weight) this is the exact map
    (``basis.gemm.fast_linear``: ``F.linear``, or oneDNN for large CPU products).
    """
    check_settings(rank, lam, scale, eps, invariant_scalars, hashing)
    if seed is not None:
        if h is not None or s is not None or generator is not None:
            raise ValueError("give one of seed, generator, or (h, s) to fix the sketch")
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
            raise ValueError(f"seed must be an integer in [0, 2**64), got {seed!r}")
    if weight.dim() != 2:
        raise ValueError(
            f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}"
        )
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"x's last dim must equal weight's in_features {weight.shape[1]}, got x of shape {tuple(x.shape)}"
        )
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    rows = x.numel() // max(x.shape[-1], 1)
    if not (torch.is_grad_enabled() and weight.requires_grad) or rows == 0:
        return gemm.fast_linear(x, weight, bias)
    _check_given_sketch(h, s, rows, min(rank, rows), hashing)
    if seed is None and h is None:
        device = generator.device if generator is not None else torch.device("cpu")
        seed = int(torch.randint(0, _SEED_BOUND, (), generator=generator, device=device))
    lam, scale, eps = float(lam), float(scale), float(eps)
    if h is not None:
        settings = (rank, lam, scale, eps, invariant_scalars, hashing, None, h, s)
        return _BasisLinearFn.apply(x, weight, bias, settings)
    return sketched_linear(x, weight, bias, rank, lam, scale, eps, invariant_scalars, hashing, seed)


def sketched_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    rank: int,
    lam: float,
    scale: float,
    eps: float,
    invariant_scalars: bool,
    hashing: str,
    seed: int,
) -> torch.Tensor:
    """``basis_linear`` with its sketch drawn from ``seed``, for callers that checked every
    argument already (``basis_linear``, ``BasisLinear``): inside a training step each line of
    Python costs several times what it does in a warm loop, so the per-call path is kept short."""
    if hashing != "gaussian":
        # fp32 on CPU: the same steps as _BasisLinearFn in one compiled operator (native.py),
        # with the same choices of GEMM library.
        y = native.sketched_linear(
            x, weight, bias, rank, lam, scale, eps, invariant_scalars, hashing == "balanced",
            seed, _SCALE_IN_SKETCH_MAX, *gemm.onednn_routes(x, weight),
        )  # fmt: skip
        if y is not None:
            return y
    settings = (rank, lam, scale, eps, invariant_scalars, hashing, seed, None, None)
    return _BasisLinearFn.apply(x, weight, bias, settings)
