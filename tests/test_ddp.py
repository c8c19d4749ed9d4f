"""torchrun DDP on CPU (gloo): the same numbers as one process, and exact resume on every rank."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from helpers_train import REPO, compose_config, make_corpus

import train
from trainer.checkpoint import load_checkpoint
from trainer.distributed import env_info, rank_seed
from trainer.metrics import read_metrics

COMMON = [
    "experiment=smoke",
    "logger=none",
    "progress=false",
    "threads=1",
    "train.steps=8",
    "eval.every=4",
    "eval.at_start=false",
    "checkpoint.every=4",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("data"))


def torchrun(args: list[str], cwd: Path, nproc: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += [f"--nproc_per_node={nproc}", str(REPO / "train.py"), *args]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def losses(run_dir: Path) -> dict[int, float]:
    return {
        r["step"]: r["train_loss"]
        for r in read_metrics(run_dir / "metrics.jsonl")
        if "train_loss" in r
    }


def test_rank_seeds_are_independent_and_rank_0_keeps_the_run_seed(monkeypatch) -> None:
    assert rank_seed(7, 0) == 7
    assert len({rank_seed(7, r) for r in range(8)}) == 8
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    info = env_info()
    assert (info.rank, info.world_size, info.enabled, info.is_main) == (3, 4, True, False)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ValueError, match="do not describe a process group"):
        env_info()


def test_two_ranks_match_one_process_with_the_same_global_batch(
    tmp_path: Path, corpus: Path
) -> None:
    # SGD, not the smoke preset's AdamW: Adam turns rounding-level gradient noise on ~0 gradients
    # into lr-sized steps, so only the losses, not the weights, would match tightly.
    common = [*COMMON, f"data.dir={corpus}", "optim=sgd", "optim.lr=0.1"]
    one, two = tmp_path / "one", tmp_path / "two"
    summary = train.train(compose_config([*common, f"run_dir={one}", "train.batch_size=2"]))
    torchrun([*common, f"run_dir={two}", "train.batch_size=1"], tmp_path)
    a, b = losses(one), losses(two)
    assert a.keys() == b.keys() == set(range(1, 9))
    print("max |loss difference|:", max(abs(a[s] - b[s]) for s in a))
    for step in a:  # the per-rank means, averaged, are the global mean: float rounding only
        assert b[step] == pytest.approx(a[step], abs=1e-5), step
    wa = load_checkpoint(one / "checkpoints" / "final.pt")["model"]
    wb = load_checkpoint(two / "checkpoints" / "final.pt")["model"]
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)
    rows = read_metrics(two / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 9))  # rank 0 alone wrote, once per step
    assert rows[-1]["tokens"] == summary["tokens"] == 8 * 2 * 32  # the global batch


@pytest.mark.slow
def test_two_rank_basis_run_trains_and_resumes_bit_identically(
    tmp_path: Path, corpus: Path
) -> None:
    basis = [*COMMON, f"data.dir={corpus}", "method=basis", "method.rank=4", "train.batch_size=2"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    with ThreadPoolExecutor(2) as pool:  # the uninterrupted run and the first half, side by side
        done = pool.map(
            lambda a: torchrun(a, tmp_path),
            [[*basis, f"run_dir={whole}"], [*basis, f"run_dir={split}", "train.stop_at=4"]],
        )
        list(done)
    state = load_checkpoint(split / "checkpoints" / "latest.pt")
    assert state["step"] == 4 and len(state["rng_ranks"]) == 2
    # rank 1's own RNG stream, not a copy of rank 0's
    assert not torch.equal(state["rng_ranks"][0]["torch"], state["rng_ranks"][1]["torch"])
    proc = torchrun([*basis, f"run_dir={split}"], tmp_path)
    assert "resuming from step 4" in proc.stdout
    assert proc.stdout.count("done |") == 1  # rank 1 prints nothing
    a = load_checkpoint(whole / "checkpoints" / "final.pt")["model"]
    b = load_checkpoint(split / "checkpoints" / "final.pt")["model"]
    for k in a:
        assert torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k], k
    la, lb = losses(whole), losses(split)
    assert la == lb and la[8] < la[1]  # it learns, and the resumed half is the same numbers
