"""scripts/eval_fixed.py and the standard errors it feeds into the report."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
from helpers_train import compose_config, make_corpus, smoke_overrides

import train
from trainer.stats import mean_se

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import eval_fixed  # noqa: E402
import report  # noqa: E402


def test_mean_se_iid_matches_the_textbook_and_grows_under_correlation():
    rng = random.Random(0)
    iid = [rng.gauss(0.0, 1.0) for _ in range(2000)]
    mean, se = mean_se(iid)
    # i.i.d. N(0, 1): SE = 1/sqrt(2000) = 0.0224; the batch-means estimate scatters around it
    # (20 blocks: relative sd ~ 1/sqrt(2*19) = 16 %), and the max of the two stays within 40 %.
    assert abs(mean) < 4 * 0.0224
    assert 0.0224 * 0.9 < se < 0.0224 * 1.4
    # Blocks of 100 equal values (like chunks of one play): the i.i.d. formula would claim
    # 0.0224 again, but only 20 independent values exist, SE ~ 1/sqrt(20) = 0.22.
    blocky = [v for v in (rng.gauss(0.0, 1.0) for _ in range(20)) for _ in range(100)]
    assert 0.1 < mean_se(blocky)[1] < 0.45
    with pytest.raises(ValueError, match="at least 2"):
        mean_se([1.0])


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("evalfixed")
    corpus = make_corpus(tmp / "data", n_val=4_000)
    overrides = smoke_overrides(tmp, corpus, "method=basis_r8", "eval.fixed_chunks=null")
    train.train(compose_config(overrides + ["train.steps=20"]))
    return tmp / "run"


def test_reproduces_the_runs_fixed_loss_and_writes_per_chunk_losses(finished_run, tmp_path):
    # train.py wrote the record of its final evaluation; recompute it from final.pt instead.
    from_train = json.loads((finished_run / "fixed_eval.json").read_text())
    (finished_run / "fixed_eval.json").unlink()
    copy_to = tmp_path / "results"
    assert eval_fixed.main([str(finished_run), "--copy-to", str(copy_to)]) == 0
    out = json.loads((finished_run / "fixed_eval.json").read_text())
    assert out["chunks"] == from_train["chunks"]
    assert (
        max(abs(a - b) for a, b in zip(out["per_chunk"], from_train["per_chunk"], strict=True))
        < 1e-5
    )
    summary = json.loads((finished_run / "summary.json").read_text())
    assert out["step"] == 20
    # the whole split: (4,000 - 1) // 32 = 124 chunks of T = 32, in whole batches of 8
    assert out["chunks"] == len(out["per_chunk"]) == 120
    assert abs(out["mean"] - summary["final_val_loss_fixed"]) < 1e-4
    assert out["se"] > 0
    assert (copy_to / finished_run.name / "fixed_eval.json").read_text() == (
        finished_run / "fixed_eval.json"
    ).read_text()
    # A rerun keeps the file as it is.
    before = (finished_run / "fixed_eval.json").stat().st_mtime_ns
    assert eval_fixed.main([str(finished_run)]) == 0
    assert (finished_run / "fixed_eval.json").stat().st_mtime_ns == before


def test_a_run_whose_loss_is_not_reproduced_gets_no_file(finished_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(finished_run, run)
    (run / "fixed_eval.json").unlink(missing_ok=True)
    summary = json.loads((run / "summary.json").read_text())
    summary["final_val_loss_fixed"] += 0.01
    (run / "summary.json").write_text(json.dumps(summary))
    assert eval_fixed.main([str(run)]) == 1
    assert "MISMATCH" in capsys.readouterr().out
    assert not (run / "fixed_eval.json").exists()


def test_unfinished_or_results_only_runs_are_skipped(finished_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "results-only"
    shutil.copytree(
        finished_run, run, ignore=shutil.ignore_patterns("checkpoints", "fixed_eval.json")
    )
    assert eval_fixed.main([str(run)]) == 0
    assert "skipped" in capsys.readouterr().out
    with pytest.raises(SystemExit) as err:
        eval_fixed.main([str(tmp_path / "nowhere")])
    assert err.value.code == 2


def _write(root: Path, tag: str, seed: int, chunks: list[float]) -> None:
    path = root / "exp" / f"{tag}-s{seed}"
    path.mkdir(parents=True)
    method = {"name": "exact"} if tag == "exact" else {"name": "basis", "rank": 32}
    (path / "config.yaml").write_text(json.dumps({"seed": seed, "method": method}))
    (path / "metrics.jsonl").write_text(json.dumps({"step": 10, "val_loss_fixed": 1.0}) + "\n")
    mean = sum(chunks) / len(chunks)
    summary = {
        "finished": True,
        "steps": 10,
        "method_tag": tag,
        "seed": seed,
        "experiment": "exp",
        "final_val_loss_fixed": mean,
    }
    (path / "summary.json").write_text(json.dumps(summary))
    (path / "fixed_eval.json").write_text(json.dumps({"per_chunk": chunks}))


def test_report_shows_the_fixed_set_se_and_the_paired_se(tmp_path):
    rng = random.Random(1)
    for seed in (1, 2):
        base = [5.0 + rng.gauss(0, 0.5) for _ in range(400)]  # chunk difficulty, shared
        _write(tmp_path, "exact", seed, base)
        _write(tmp_path, "basis-r32", seed, [b + 0.05 + rng.gauss(0, 0.02) for b in base])
    runs = [report.read_run(p) for p in report.find_run_dirs(tmp_path)]
    (exp,) = report.group_runs(runs, None)
    rows = {e["tag"]: e for e in report.aggregate(exp)}
    d = rows["basis-r32"]["d_val_fixed"]
    assert abs(d["mean"] - 0.05) < 0.01
    # Paired: per seed 0.02/sqrt(400) = 0.001, over two seeds 0.001/sqrt(2) = 0.0007 (the
    # batch-means estimate scatters by ~16 %); unpaired it would be ~0.5/sqrt(400) = 0.025.
    assert 0.0004 < d["se"] < 0.0012
    assert 0.015 < rows["exact"]["val_fixed"]["se"] < 0.035
    table = report.render_markdown([exp], {})
    assert "SE 0.00" in table and "(SE 0.0" in table
    # one line per seed: that seed's Δ (about +0.05) with its own SE (0.02/sqrt(400) = 0.001)
    per_seed = table.split("### Paired differences per seed")[1].splitlines()
    per_seed = [line for line in per_seed if line.startswith("| BASIS R=32 | ")]
    assert [line.split("|")[2].strip() for line in per_seed] == ["1", "2"]
    for line in per_seed:
        d, se = line.split("|")[3].split("±")
        assert abs(float(d) - 0.05) < 0.01 and 0.0005 < float(se) < 0.002
