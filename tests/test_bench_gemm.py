"""scripts/bench_gemm.py runs and routes shapes the way basis/gemm.py does."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from basis import gemm

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_gemm.py"


def test_bench_gemm_quick_table():
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--repeats", "2", "--threads", "1"],
        capture_output=True, text=True, check=True, timeout=120,
    )  # fmt: skip
    rows = [line for line in out.stdout.splitlines() if line.startswith("| 64 ")]
    if "unavailable" in out.stdout:  # a torch build without oneDNN: nothing to compare
        assert rows == []
        return
    assert len(rows) == 4
    routed = {r.split("|")[1].strip(): r.split("|")[-2].strip() for r in rows}
    assert routed["64 × 64 → 256"] == "MKL, MKL"  # below gemm.MIN_MACS
    # The head: the libraries this machine's stored choices (basis/gemm.py) name, at 1 thread.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x, w, dy = torch.randn(64, 64), torch.randn(50257, 64), torch.randn(64, 50257)
        want = [gemm.use_onednn(x, w), gemm.use_onednn(dy, w, "input_grad")]
    finally:
        torch.set_num_threads(before)
    assert routed["64 × 64 → 50257"] == ", ".join("oneDNN" if u else "MKL" for u in want)
