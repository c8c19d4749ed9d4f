"""The sketching operator S (R_eff × rows) of BASIS; count sketches are materialised only when small.

A count sketch is defined by a bin id ``h[i]`` and a sign ``s[i]`` per row, so ``S X`` is a signed
segment sum of X's rows into R bins (for small products a dense R × B matrix times X, one GEMM, is
cheaper than the segment sum's several ops). On CPU in fp32 a compiled kernel
(``native.py``) does it in one pass, with the norms the invariant scalar needs. The Gaussian peer
(random projection, Bershatsky et al. 2022) is a dense S with N(0, 1/R) entries; it is here only
as a comparison point.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from . import native
from .rng import count_sketch_hashes

HASHINGS = ("balanced", "uniform", "gaussian")
# Below this many elements (64 × 2,048) building the CSR matrix costs more than index_add_'s
# extra pass: 0.048 vs 0.034 ms at 64 × 64; at 64 × 50,257, R = 32 the CSR product wins: 0.5-0.8
# vs 0.9 ms (2 threads), and the paper model's step is ~0.5 ms faster with it (median of 6).
_CSR_MIN_NUMEL = 1 << 17
# Up to this many multiply-adds (R · B · K) S is built dense and applied as one small GEMM: two
# ops (zeros, scatter) and a matmul instead of index_add_'s five, which is what a sketched call
# costs at the paper's size (64 rows, K = 64 or 256): 8.5 vs 19 µs at 64 × 64, R = 32, 1 thread.
_DENSE_MAX_MACS = 1 << 20
_DOT_MIN_NUMEL = 1 << 16


@dataclass(frozen=True)
class Sketch:
    """One draw of S. ``h``/``s`` for count sketches, ``dense`` for the Gaussian peer."""

    rank: int  # R_eff
    h: torch.Tensor | None = None  # (rows,) int64 in [0, rank)
    s: torch.Tensor | None = None  # (rows,) ±1, in the dtype the rows are summed in
    dense: torch.Tensor | None = None  # (rank, rows)

    def apply(self, rows: torch.Tensor) -> torch.Tensor:
        """Return ``S @ rows`` for ``rows`` of shape (B, K), accumulated in ``rows``' dtype."""
        device = rows.device.type
        if device in ("cpu", "cuda") and torch.is_autocast_enabled(device):
            # Autocast would run these products in bf16; the sketch sums in the rows' dtype.
            with torch.autocast(device, enabled=False):
                return self._apply(rows)
        return self._apply(rows)

    def apply_with_gamma(
        self, rows: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor | float]:
        """``(S @ rows, γ)`` with the invariant scalar γ = ‖rows‖_F / (‖S @ rows‖_F + ε): one
        pass over ``rows`` by the compiled kernel where it applies (count sketch, fp32 CPU)."""
        if self.h is not None:
            fused = native.count_sketch(rows, self.h, self.s, self.rank)
            if fused is not None:
                out, sq_rows, sq_out = fused
                return out, scalar_from_squares(sq_rows, sq_out, eps)
        out = self.apply(rows)
        return out, invariant_scalar(rows, out, eps)

    def _apply(self, rows: torch.Tensor) -> torch.Tensor:
        if self.dense is not None:
            return self.dense.to(rows.dtype) @ rows
        fused = native.count_sketch(rows, self.h, self.s, self.rank)
        if fused is not None:
            return fused[0]
        if self.rank == 1:  # one signed sum of all rows: a matrix-vector product
            return (self.s.to(rows.dtype) @ rows).unsqueeze(0)
        if self.rank * rows.numel() <= _DENSE_MAX_MACS:
            return self._dense_count(rows.shape[0], rows.dtype) @ rows
        if (
            rows.device.type == "cpu"
            and rows.dtype in (torch.float32, torch.float64)
            and rows.numel() >= _CSR_MIN_NUMEL
        ):
            return torch.sparse.mm(self._csr(rows.shape[0], rows.dtype), rows)
        return self._index_add(rows)

    def _dense_count(self, rows: int, dtype: torch.dtype) -> torch.Tensor:
        """S as a dense (R, B) matrix: column i holds s[i] in row h[i]."""
        s = self.s.to(dtype).unsqueeze(0)
        return s.new_zeros(self.rank, rows).scatter_(0, self.h.unsqueeze(0), s)

    def _index_add(self, rows: torch.Tensor) -> torch.Tensor:
        """Off CPU (CUDA: atomics): rows with s = +1 go to bins [0, R), rows with s = -1 to bins
        [R, 2R); one index_add_ reads X once, with no signed B × K copy."""
        signed_bins = self.h + self.rank * (self.s < 0)
        out = rows.new_zeros(2 * self.rank, rows.shape[1]).index_add_(0, signed_bins, rows)
        return out[: self.rank] - out[self.rank :]

    def _csr(self, rows: int, dtype: torch.dtype) -> torch.Tensor:
        """S as a sparse CSR matrix: one ±1 per column. On CPU its product reads X once and
        writes only R × K, where index_add_ into 2R bins wrote and re-read a 2R × K buffer
        (the 64 × 50,257 head at R = 32, 2 threads: 0.44 vs 2.2 ms in a model step when this was
        written; 0.5-0.8 vs 0.9 ms in a later cache-hot loop)."""
        order = torch.argsort(self.h, stable=True)
        crow = self.h.new_zeros(self.rank + 1)
        crow[1:] = torch.bincount(self.h, minlength=self.rank).cumsum(0)
        with warnings.catch_warnings():  # "sparse CSR support is in beta": the product is not
            warnings.simplefilter("ignore")
            return torch.sparse_csr_tensor(
                crow, order, self.s[order].to(dtype), (self.rank, rows), device=self.h.device
            )


def draw_sketch(
    rows: int,
    rank: int,
    hashing: str,
    seed: int,
    device: torch.device | str = "cpu",
) -> Sketch:
    """Draw S for ``rows`` rows into ``min(rank, rows)`` bins from ``seed`` (an integer in
    [0, 2⁶⁴)) (spec §1, forward steps 2-4). The same seed gives the same count sketch on every
    device (``rng.py``); on CPU the compiled kernel draws it in one call."""
    r_eff = min(rank, rows)
    if hashing == "gaussian":
        gen = torch.Generator(device=device).manual_seed(seed)
        dense = torch.randn(r_eff, rows, generator=gen, device=device) / r_eff**0.5
        return Sketch(rank=r_eff, dense=dense)
    if hashing not in ("balanced", "uniform"):
        raise ValueError(f"hashing must be one of {HASHINGS}, got {hashing!r}")
    # balanced: h = random_permutation(arange(B) mod R), so each bin gets ⌊B/R⌋ or ⌈B/R⌉ rows.
    balanced = hashing == "balanced"
    drawn = None
    if torch.device(device).type == "cpu":
        drawn = native.draw_count_sketch(rows, r_eff, balanced, seed)
    h, s = drawn if drawn is not None else count_sketch_hashes(rows, r_eff, balanced, seed, device)
    return Sketch(rank=r_eff, h=h, s=s)


def invariant_scalar(full: torch.Tensor, sketched: torch.Tensor, eps: float) -> torch.Tensor:
    """γ = ‖full‖_F / (‖sketched‖_F + ε), in fp32, as a 0-dim tensor (no host sync)."""
    return frobenius_norm(full) / (frobenius_norm(sketched) + eps)


def scalar_from_squares(sq_full: float, sq_sketched: float, eps: float) -> float:
    """γ = ‖full‖_F / (‖sketched‖_F + ε) from the two squared norms (as the kernel returns them)."""
    return math.sqrt(sq_full) / (math.sqrt(sq_sketched) + eps)


def frobenius_norm(t: torch.Tensor) -> torch.Tensor:
    """‖t‖_F in fp32. Large contiguous fp32 CPU tensors take BLAS's dot, which reads them at
    memory speed: 0.13 vs 0.35 ms for the head's 64 × 50,257 dY (2 threads)."""
    if (
        t.device.type == "cpu"
        and t.dtype == torch.float32
        and t.numel() >= _DOT_MIN_NUMEL
        and t.is_contiguous()
    ):
        v = t.reshape(-1)
        return torch.dot(v, v).sqrt()
    return torch.linalg.vector_norm(t, dtype=torch.float32)
