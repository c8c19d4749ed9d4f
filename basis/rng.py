"""SplitMix64 streams in PyTorch integer ops: the generator behind every count sketch.

Element i of the stream from ``seed`` is a function of (seed, i) alone (a counter-based
generator, Steele, Lea & Flood 2014), so the compiled kernel (``csrc/count_sketch.c``) and these
tensor ops draw the same h and s from the same seed on any device, and drawing a sketch is one
pass over B counters rather than a stateful generator (which, per sketched call, cost several
small ops and a ``torch.Generator``: ~50 µs of a 64-row layer's ~0.3 ms in a training step).
int64 tensors hold the uint64 bits: products wrap modulo 2⁶⁴ and right shifts are masked to be
logical, which is exactly C's uint64 arithmetic.
"""

from __future__ import annotations

import torch

_MASK64 = (1 << 64) - 1
_PHI = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB
# The signs come from the stream of seed ^ SIGN_SALT, independent of the bins' stream.
SIGN_SALT = 0xD1B54A32D192ED03


def mix_seed(*values: int) -> int:
    """A well-spread 63-bit seed from integers (SplitMix64's multipliers), stable across processes:
    the per-layer, per-call and per-rank seeds that the streams below start from."""
    z = _PHI
    for v in values:
        z = (z ^ (v & _MASK64)) * _MIX1 & _MASK64
        z = (z ^ (z >> 31)) * _MIX2 & _MASK64
        z ^= z >> 29
    return z >> 1


def as_int64(u: int) -> int:
    """The int64 whose bits are those of the uint64 ``u``."""
    u &= _MASK64
    return u - (1 << 64) if u >> 63 else u


def _shr(z: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 bits (PyTorch's ``>>`` is arithmetic)."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def splitmix64(seed: int, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Elements 0 … n−1 of the SplitMix64 stream from ``seed``, as int64 holding uint64 bits."""
    z = torch.arange(1, n + 1, dtype=torch.int64, device=device) * as_int64(_PHI)
    z = z + as_int64(seed)
    z = (z ^ _shr(z, 30)) * as_int64(_MIX1)
    z = (z ^ _shr(z, 27)) * as_int64(_MIX2)
    return z ^ _shr(z, 31)


def count_sketch_hashes(
    rows: int, rank: int, balanced: bool, seed: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(h, s)`` for ``rows`` rows into ``rank`` bins, the same as the compiled kernel draws.

    Keys are the top 63 bits of the stream from ``seed``. Balanced: rows ranked by key (ties by
    row) go to bin rank mod R, i.e. h = random_permutation(arange(B) mod R); uniform: h = key mod R.
    s = ±1 from the top bit of the stream from ``seed ^ SIGN_SALT``.
    """
    keys = _shr(splitmix64(seed, rows, device), 1)
    if balanced:
        order = torch.sort(keys, stable=True).indices
        h = torch.empty_like(order)
        h[order] = torch.arange(rows, device=device) % rank
    else:
        h = keys % rank
    negative = splitmix64(seed ^ SIGN_SALT, rows, device) < 0
    s = 1.0 - 2.0 * negative.to(torch.float32)
    return h, s
