"""The count sketch's generator: SplitMix64 in tensor ops, the same draw in C, uniform permutations."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from basis import native
from basis.rng import SIGN_SALT, count_sketch_hashes, splitmix64
from basis.sketch import draw_sketch

_MASK = (1 << 64) - 1


def reference_splitmix64(seed: int, i: int) -> int:
    """SplitMix64 as published, in Python integers (unbounded, masked to 64 bits)."""
    z = (seed + (i + 1) * 0x9E3779B97F4A7C15) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


@pytest.mark.parametrize("seed", [0, 1, 12345, 2**63 - 1, 2**63, 2**64 - 1])
def test_tensor_stream_is_splitmix64(seed: int) -> None:
    got = [v & _MASK for v in splitmix64(seed, 300).tolist()]
    assert got == [reference_splitmix64(seed, i) for i in range(300)]
    if seed == 0:  # the first output of SplitMix64 from seed 0, as published
        assert got[0] == 0xE220A8397B1DCDAF


@pytest.mark.skipif(not native.available(), reason="no C compiler")
@pytest.mark.parametrize("balanced", [True, False])
@pytest.mark.parametrize("rows,rank", [(1, 1), (64, 32), (64, 1), (37, 37), (5000, 7)])
def test_compiled_draw_equals_the_tensor_draw(balanced: bool, rows: int, rank: int) -> None:
    for seed in (3, 2**64 - 5):
        h, s = native.draw_count_sketch(rows, rank, balanced, seed)
        want_h, want_s = count_sketch_hashes(rows, rank, balanced, seed)
        assert torch.equal(h, want_h) and torch.equal(s, want_s)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_same_seed_same_sketch_on_cuda() -> None:
    for hashing in ("balanced", "uniform"):
        cpu = draw_sketch(300, 16, hashing, seed=9)
        gpu = draw_sketch(300, 16, hashing, seed=9, device="cuda")
        assert torch.equal(cpu.h, gpu.h.cpu()) and torch.equal(cpu.s, gpu.s.cpu())


def chi_square_p(counts: list[int]) -> float:
    """Upper-tail p-value of Pearson's χ² against equal cell probabilities (Wilson–Hilferty)."""
    n, k = sum(counts), len(counts)
    stat = sum((c - n / k) ** 2 / (n / k) for c in counts)
    df = k - 1
    z = ((stat / df) ** (1 / 3) - (1 - 2 / (9 * df))) / math.sqrt(2 / (9 * df))
    return 0.5 * math.erfc(z / math.sqrt(2))


def test_balanced_draws_are_uniform_random_permutations_with_fair_signs() -> None:
    # rows = rank = 4: h is a permutation of 0..3; over 12,000 seeds each of the 24 should come
    # up ~500 times and each row's sign be +1 half the time. Fixed seeds; fail below p = 0.001.
    perms = {p: 0 for p in itertools.permutations(range(4))}
    plus = torch.zeros(4)
    for seed in range(12_000):
        h, s = count_sketch_hashes(4, 4, True, seed)
        perms[tuple(h.tolist())] += 1
        plus += s > 0
    assert chi_square_p(list(perms.values())) > 1e-3
    # each row's share of +1 within 4 standard errors (sd 0.5 / sqrt(12,000) = 0.0046) of 1/2
    assert float((plus / 12_000 - 0.5).abs().max()) < 4 * 0.5 / math.sqrt(12_000)


def test_uniform_hashing_fills_bins_evenly_and_independently() -> None:
    # 200 seeds × 64 rows into 8 bins: bin counts pooled and per row pair (h_0, h_1) uniform.
    pooled = [0] * 8
    pairs = [0] * 64
    for seed in range(200):
        h, _ = count_sketch_hashes(64, 8, False, seed)
        for b in h.tolist():
            pooled[b] += 1
        pairs[h[0] * 8 + h[1]] += 1
    assert chi_square_p(pooled) > 1e-3
    assert chi_square_p(pairs) > 1e-3


def test_signs_come_from_their_own_stream() -> None:
    # The sign stream is the key stream of seed ^ SIGN_SALT: signs of one draw are not a function
    # of its bins (they would be if both came from the same bits).
    h, s = count_sketch_hashes(2000, 2, False, 77)
    assert torch.equal(s < 0, splitmix64(77 ^ SIGN_SALT, 2000) < 0)
    agree = float(((h == 1) == (s < 0)).float().mean())
    assert abs(agree - 0.5) < 4 * 0.5 / math.sqrt(2000)
