"""Means and standard errors, in plain Python (the report scripts use them without torch)."""

from __future__ import annotations

import math
from collections.abc import Sequence


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (nan for fewer than two values)."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def mean_se(values: Sequence[float], blocks: int = 20) -> tuple[float, float]:
    """Mean and its standard error, the larger of the i.i.d. estimate and the batch-means one.

    Neighbouring validation chunks are consecutive text, so their losses are correlated and the
    i.i.d. formula sd/√n can understate the error; the means of ``blocks`` contiguous blocks are
    close to independent, and sd(block means)/√blocks does not assume independence of chunks.
    """
    n = len(values)
    if n < 2:
        raise ValueError(f"a standard error needs at least 2 values, got {n}")
    mean, sd = mean_std(values)
    se = sd / math.sqrt(n)
    k = min(blocks, n // 2)
    if k >= 2:
        edges = [round(i * n / k) for i in range(k + 1)]
        block_means = [
            sum(values[a:b]) / (b - a) for a, b in zip(edges[:-1], edges[1:], strict=True)
        ]
        se = max(se, mean_std(block_means)[1] / math.sqrt(k))
    return mean, se


def fixed_eval_record(losses: Sequence[float], *, step: int, block_size: int) -> dict:
    """What ``fixed_eval.json`` holds: the fixed set's per-chunk losses at ``step``, their mean
    and its standard error (written by train.py at the end of a run, or by
    scripts/eval_fixed.py from a finished run's final checkpoint)."""
    mean, se = mean_se(losses)
    return {
        "step": step,
        "chunks": len(losses),
        "block_size": block_size,
        "tokens": len(losses) * block_size,
        "mean": mean,
        "se": se,
        "per_chunk": [round(v, 6) for v in losses],
    }
