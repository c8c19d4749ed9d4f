"""scripts/bench_step.py: whole training steps, exact vs BASIS, interleaved and paired."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))

import bench_step  # noqa: E402
from _common import load_model_config  # noqa: E402

from basis import BasisLinear  # noqa: E402


def test_every_method_starts_from_the_same_weights_and_only_basis_sketches():
    cfg = load_model_config("tiny")
    exact, _ = bench_step.build("exact", cfg)
    sketched, optimizer = bench_step.build("R=4", cfg)
    exact_state = {k: v for k, v in exact.state_dict().items() if not k.endswith("_extra_state")}
    for name, value in exact_state.items():
        assert torch.equal(value, sketched.state_dict()[name]), name
    basis = [n for n, m in sketched.named_modules() if isinstance(m, BasisLinear)]
    assert basis == ["transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj",
                     "transformer.h.1.mlp.c_fc", "transformer.h.1.mlp.c_proj", "lm_head"]  # fmt: skip
    assert not any(isinstance(m, BasisLinear) for m in exact.modules())
    before = sketched.lm_head.weight.detach().clone()
    x = torch.randint(0, cfg["vocab_size"], (1, 9))
    bench_step.step(sketched, optimizer, x[:, :-1], x[:, 1:])
    assert not torch.equal(before, sketched.lm_head.weight)  # a step updates the weights
    assert all(p.grad is None for p in sketched.parameters())  # and leaves no gradients


def test_summary_pairs_each_round_with_exact():
    per_round = {"exact": [10.0, 20.0, 10.0], "R=32": [9.0, 22.0, 10.0]}
    rows = {r["method"]: r for r in bench_step.summarize(per_round)}
    assert rows["exact"]["ratio_vs_exact"] == 1.0 and rows["exact"]["ratio_se"] == 0.0
    r32 = rows["R=32"]
    assert r32["ratio_vs_exact"] == pytest.approx((0.9 + 1.1 + 1.0) / 3)
    assert r32["ratio_se"] == pytest.approx(0.1 / 3**0.5)  # sd of (0.9, 1.1, 1.0) over √3
    assert r32["rounds_faster"] == 1 and r32["rounds"] == 3
    assert r32["ms_per_step"] == pytest.approx(1e3 * 10.0)  # the median round


def test_runs_end_to_end_on_the_tiny_model():
    out = subprocess.run(
        [sys.executable, str(SCRIPTS / "bench_step.py"), "--model", "tiny", "--ranks", "4,1",
         "--rounds", "2", "--steps", "2", "--skip", "1", "--block", "16", "--threads", "1",
         "--json"],
        capture_output=True, text=True, check=True, timeout=300,
    )  # fmt: skip
    rows = json.loads(out.stdout)["rows"]
    assert [r["method"] for r in rows] == ["exact", "R=4", "R=1"]
    assert all(r["ms_per_step"] > 0 and r["rounds"] == 2 for r in rows)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--rounds", "1"], "--rounds must be >= 2"),
        (["--ranks", "0"], "--ranks must be integers >= 1"),
        (["--model", "tiny", "--block", "999"], "exceeds the model's block_size"),
        (["--model", "nope"], "unknown model 'nope'"),
    ],
)
def test_bad_arguments_are_one_line(args, message):
    out = subprocess.run(
        [sys.executable, str(SCRIPTS / "bench_step.py"), *args], capture_output=True, text=True
    )
    assert out.returncode == 2
    assert message in out.stderr and "Traceback" not in out.stderr
