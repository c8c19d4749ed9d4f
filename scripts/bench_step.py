"""Time whole training steps of one model, exact and BASIS, interleaved in one process.

    python scripts/bench_step.py                        # the paper model, exact vs R = 32 and R = 1
    python scripts/bench_step.py --ranks 32 --rounds 40 --json

A step is what ``train.py`` does per step: forward with the loss, backward, the optimizer's
update, gradients set to None. Every method gets its own copy of the model (same initial
weights) and optimizer, and the methods take turns: each round runs ``--steps`` steps of each, in a
new random order, and times every step. Machine noise (other processes, clock drift) then hits
all methods alike, and each round gives one paired ratio, method / exact, so the verdict "BASIS is
no slower than exact" comes with a confidence interval instead of separate runs minutes apart
(where an unchanged program drifts by ±1 ms/step on our machines). The first ``--skip`` steps of
each turn are not timed: they pay for the cache the other methods' models evicted.

Tokens are random (a fixed seed): a step's cost does not depend on their values. Threads and
glibc's allocator are set as ``train.py`` sets them.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time

import _common  # noqa: F401  (puts the repository on sys.path)
import torch
from _common import UsageError, fail, load_config, load_model_config, md_table, parse_int_list

from basis import apply_basis
from basis.native import prepare as prepare_native
from model import GPT, GPTConfig
from trainer.optim import build_optimizer
from trainer.runtime import keep_freed_memory, set_threads
from trainer.stats import mean_se


def build(method: str, model_cfg: dict) -> tuple[GPT, torch.optim.Optimizer]:
    """The model and optimizer of ``method`` ("exact" or "R=<rank>"), as ``train.py`` builds them
    from ``optim=sgd`` (the paper's) and ``method=basis`` with that rank."""
    torch.manual_seed(0)  # the same initial weights for every method
    model = GPT(GPTConfig.from_dict(model_cfg))
    if method != "exact":
        mc = load_config("method", "basis")
        apply_basis(
            model, mc["layers"], rank=int(method.removeprefix("R=")), lam=mc["lam"],
            scale=mc["scale"], eps=mc["eps"], invariant_scalars=mc["invariant_scalars"],
            hashing=mc["hashing"], seed=0,
        )  # fmt: skip
    model.train()
    return model, build_optimizer(model, load_config("optim", "sgd"), "cpu")


def step(model: GPT, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    _, loss = model(x, y)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def bench(
    methods: list[str],
    model_cfg: dict,
    batch: int,
    block: int,
    rounds: int,
    steps: int,
    skip: int,
    seed: int = 0,
) -> dict[str, list[float]]:
    """Seconds per step, per method and round (the median of the round's timed steps)."""
    runs = {m: build(m, model_cfg) for m in methods}
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(
        0, model_cfg["vocab_size"], (steps + skip, batch, block + 1), generator=gen
    )
    order = random.Random(seed)
    per_round: dict[str, list[float]] = {m: [] for m in methods}
    for _ in range(rounds):
        for method in order.sample(methods, len(methods)):
            model, optimizer = runs[method]
            times = []
            for i, seq in enumerate(tokens):
                t0 = time.perf_counter()
                step(model, optimizer, seq[:, :-1], seq[:, 1:])
                if i >= skip:
                    times.append(time.perf_counter() - t0)
            per_round[method].append(statistics.median(times))
    return per_round


def summarize(per_round: dict[str, list[float]]) -> list[dict]:
    exact = per_round["exact"]
    rows = []
    for method, times in per_round.items():
        ratios = [t / e for t, e in zip(times, exact, strict=True)]
        ratio, se = mean_se(ratios)
        rows.append(
            {
                "method": method,
                "ms_per_step": 1e3 * statistics.median(times),
                "ratio_vs_exact": ratio,
                "ratio_se": se,
                "rounds_faster": sum(r < 1 for r in ratios),
                "rounds": len(ratios),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="paper", help="a configs/model preset (default paper)")
    parser.add_argument("--ranks", default="32,1", help="BASIS ranks to time (default 32,1)")
    parser.add_argument("--batch", type=int, default=1, help="sequences per step (default 1)")
    parser.add_argument("--block", type=int, default=64, help="tokens per sequence (default 64)")
    parser.add_argument("--rounds", type=int, default=20, help="turns per method (default 20)")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per turn (default 30)")
    parser.add_argument("--skip", type=int, default=5, help="untimed steps per turn (default 5)")
    parser.add_argument("--threads", type=int, default=0, help="0 = every core (as train.py)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    prog = "bench_step.py"
    try:
        ranks = parse_int_list(args.ranks, "--ranks")
        model_cfg = load_model_config(args.model)
        for name, least in (("batch", 1), ("block", 1), ("rounds", 2), ("steps", 1)):
            if getattr(args, name) < least:
                raise UsageError(f"--{name} must be >= {least}, got {getattr(args, name)}")
        if args.skip < 0 or args.threads < 0:
            raise UsageError("--skip and --threads must be >= 0")
        if args.block > model_cfg["block_size"]:
            raise UsageError(f"--block {args.block} exceeds the model's block_size")
    except UsageError as e:
        fail(prog, str(e))
    threads = set_threads(args.threads or None)
    keep_freed_memory()
    prepare_native()  # a first build of the compiled operator (~15 s) is not a step's cost
    methods = ["exact", *(f"R={r}" for r in ranks)]
    per_round = bench(
        methods, model_cfg, args.batch, args.block, args.rounds, args.steps, args.skip
    )
    rows = summarize(per_round)
    if args.json:
        print(json.dumps({"threads": threads, "args": vars(args), "rows": rows}, indent=2))
        return
    print(
        f"model {args.model}, batch {args.batch} x {args.block} tokens, {threads} threads, "
        f"{args.rounds} rounds x {args.steps} steps per method (median per round)"
    )
    print(
        md_table(
            ["method", "ms/step (median of rounds)", "ratio vs exact (mean ± SE)", "rounds faster"],
            [
                (
                    r["method"],
                    f"{r['ms_per_step']:.2f}",
                    f"{r['ratio_vs_exact']:.3f} ± {r['ratio_se']:.3f}",
                    f"{r['rounds_faster']}/{r['rounds']}",
                )
                for r in rows
            ],
        )
    )


if __name__ == "__main__":
    main(sys.argv[1:])
