"""scripts/bench_basis.py runs end to end and its saved-bytes column is the analytic R/rows."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_basis.py"


def test_bench_json_on_a_small_shape():
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--json", "--shape", "128,16,24", "--repeats", "1",
         "--warmup", "0", "--draws", "2", "--threads", "1"],
        capture_output=True, text=True, check=True, timeout=120,
    )  # fmt: skip
    rows = json.loads(out.stdout)["results"]
    assert [r["rank"] for r in rows] == [1, 8, 32]
    for r in rows:
        # BASIS keeps X̂ (R × N fp32) and nothing of X's size; nn.Linear keeps X (rows × N).
        assert r["saved_bytes"] == r["rank"] * 16 * 4
        assert r["exact_saved_bytes"] == 128 * 16 * 4
        assert r["fwd_ms"] > 0 and r["bwd_ms"] > 0
        assert r["same_fwd_ms"] > 0 and r["same_bwd_ms"] > 0  # the oneDNN-backed exact layer
        assert r["fwd_ratio_same"] == pytest.approx(r["fwd_ms"] / r["same_fwd_ms"])
    errors = [r["rel_error"] for r in rows]
    assert errors[0] > errors[1] > errors[2]  # more rank, less error


def test_bench_rejects_a_bad_shape():
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--shape", "128,x,24"], capture_output=True, text=True
    )
    assert out.returncode == 2 and "ROWS,N,M" in out.stderr


@pytest.mark.parametrize("rows,expected", [(64, [1, 8, 32]), (8192, [1, 8, 32, 128])])
def test_ranks_follow_the_issue(rows, expected):
    sys.path.insert(0, str(SCRIPT.parent))
    import bench_basis

    assert bench_basis.ranks_for(rows) == expected
