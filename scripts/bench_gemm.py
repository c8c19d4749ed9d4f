"""Time a linear layer's GEMMs through PyTorch's default (MKL) and through oneDNN (basis/gemm.py).

    python scripts/bench_gemm.py                 # the paper's shapes and two larger ones
    python scripts/bench_gemm.py --threads 1
    python scripts/bench_gemm.py --quick       # the paper's shapes only

Forward ``x @ Wᵀ`` and input gradient ``dY @ W`` per shape, medians of ``--repeats`` calls, the
two libraries timed in alternation so load from other processes hits both alike. The ratio is
oneDNN over MKL (below 1: oneDNN is faster). The last column is the library the layers use for
each product here: MKL below ``gemm.MIN_MACS`` multiply-adds, above it the one ``gemm.py`` timed
as faster on this machine (``BASIS_ONEDNN=auto``) and stored in the cache.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from _common import md_table  # also puts the repo on sys.path

from basis import gemm

# (rows, in, out): the paper's attention/MLP/head linears at batch 1 x 64, then GPT-2-small sizes.
SHAPES = [
    (64, 64, 192),
    (64, 64, 256),
    (64, 256, 64),
    (64, 64, 50257),
    (1024, 768, 3072),
    (1024, 768, 50257),
]


def alternate(fns: list[Callable[[], object]], repeats: int, warmup: int = 3) -> list[float]:
    times: list[list[float]] = [[] for _ in fns]
    for i in range(warmup + repeats):
        for fn, ts in zip(fns, times, strict=True):
            t0 = time.perf_counter()
            fn()
            if i >= warmup:
                ts.append(time.perf_counter() - t0)
    return [statistics.median(ts) for ts in times]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--quick", action="store_true", help="the paper's (64-row) shapes only")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not gemm.onednn_available():
        print("oneDNN route unavailable here (see basis/gemm.py); everything runs through MKL")
        return 0
    op = gemm._op()
    rows = []
    for b, n, m in [s for s in SHAPES if s[0] == 64] if args.quick else SHAPES:
        x, w, dy = torch.randn(b, n), torch.randn(m, n), torch.randn(b, m)
        f_mkl, f_dnn = alternate(
            [partial(F.linear, x, w), partial(op, x, w, None, "none", [], "")], args.repeats
        )
        d_mkl, d_dnn = alternate(
            [partial(torch.mm, dy, w), partial(op, dy, w.t(), None, "none", [], "")], args.repeats
        )
        library = {True: "oneDNN", False: "MKL"}
        routed = (
            f"{library[gemm.use_onednn(x, w)]}, {library[gemm.use_onednn(dy, w, 'input_grad')]}"
        )
        rows.append(
            [
                f"{b} × {n} → {m}",
                f"{f_mkl * 1e3:.3f}",
                f"{f_dnn * 1e3:.3f}",
                f"{f_dnn / f_mkl:.2f}",
                f"{d_mkl * 1e3:.3f}",
                f"{d_dnn * 1e3:.3f}",
                f"{d_dnn / d_mkl:.2f}",
                routed,
            ]
        )
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); times in ms")
    print(
        md_table(
            [
                "shape",
                "fwd MKL",
                "fwd oneDNN",
                "ratio",
                "dX MKL",
                "dX oneDNN",
                "ratio",
                "layers use (fwd, dX)",
            ],
            rows,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
