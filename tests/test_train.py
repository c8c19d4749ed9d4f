"""train.py end to end on a tiny corpus: learning, run directories, exact resume, skip, errors."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from helpers_train import compose_config, make_corpus, run_cli, smoke_overrides

import train
from trainer.checkpoint import CheckpointError, load_checkpoint
from trainer.config import ConfigError
from trainer.metrics import read_metrics

# Short enough for a test, long enough to cross two checkpoints and three evaluations.
SHORT = ["train.steps=24", "eval.every=8", "checkpoint.every=8"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("data"))


def run(tmp_path: Path, corpus: Path, *extra: str) -> dict:
    return train.train(compose_config(smoke_overrides(tmp_path, corpus, *extra)))


def final_model(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir / "checkpoints" / "final.pt")["model"]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        else:  # BASIS layers' extra state: sketch seed and call counter
            assert a[k] == b[k], k


def test_smoke_run_learns_and_writes_its_run_directory(tmp_path: Path, corpus: Path) -> None:
    summary = run(tmp_path, corpus, "eval.fixed_every=40")
    run_dir = tmp_path / "run"
    rows = read_metrics(run_dir / "metrics.jsonl")
    steps = [r["step"] for r in rows]
    assert steps == list(range(61)) and len(set(steps)) == len(steps)
    assert rows[0]["val_loss"] > 10.0  # ~ln(50257) at init
    assert summary["final_val_loss"] < rows[0]["val_loss"] - 1.0
    assert summary["final_val_loss_fixed"] < rows[0]["val_loss_fixed"] - 1.0
    assert summary["final_train_loss"] == rows[-1]["train_loss"]
    for key in ("train_loss", "lr", "tokens", "tokens_per_s", "elapsed_s"):
        assert key in rows[-1]
    assert [r["step"] for r in rows if "val_loss" in r] == [0, 20, 40, 60]
    assert [r["step"] for r in rows if "val_loss_fixed" in r] == [0, 40, 60]
    saved = json.loads((run_dir / "summary.json").read_text())
    assert saved["finished"] is True and saved["steps"] == 60
    for key in ("wall_s", "tokens_per_s", "ms_per_step", "peak_memory_bytes", "git_commit"):
        assert key in saved
    assert (saved["method"], saved["rank"], saved["seed"]) == ("exact", None, 0)
    # the fixed set's final per-chunk losses: their mean is the logged loss, with its SE
    fixed = json.loads((run_dir / "fixed_eval.json").read_text())
    # one loss per sequence: eval.fixed_chunks=2 loader chunks of eval.fixed_batch_size=8 rows
    assert fixed["step"] == 60 and fixed["chunks"] == len(fixed["per_chunk"]) == 16
    assert fixed["mean"] == pytest.approx(saved["final_val_loss_fixed"], abs=1e-6)
    assert saved["final_val_loss_fixed_se"] == fixed["se"] > 0
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["final.pt"]
    assert "experiment_name: smoke" in (run_dir / "config.yaml").read_text()


def test_run_dir_is_derived_from_the_config(tmp_path: Path, corpus: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    overrides = [o for o in smoke_overrides(tmp_path, corpus) if not o.startswith("run_dir=")]
    summary = train.train(
        compose_config(
            [*overrides, *SHORT, "method=basis", "method.rank=4", "method.hashing=uniform"]
        )
    )
    assert summary["method_tag"] == "basis-r4-uniform"
    assert (tmp_path / "runs" / "smoke" / "basis-r4-uniform-s0" / "summary.json").is_file()


@pytest.mark.parametrize("method", [["method=exact"], ["method=basis", "method.rank=4"]])
def test_resume_is_bit_identical(tmp_path: Path, corpus: Path, method: list[str]) -> None:
    straight = run(tmp_path / "a", corpus, *SHORT, *method)
    # "Killed" after step 12: checkpoint at 8, metrics rows up to 12, then a torn line.
    first = run(tmp_path / "b", corpus, *SHORT, *method, "train.stop_at=12")
    assert first["finished"] is False
    b = tmp_path / "b" / "run"
    assert not (b / "checkpoints" / "final.pt").exists()
    latest = b / "checkpoints" / "latest.pt"
    assert load_checkpoint(latest)["step"] == 12
    rows = read_metrics(b / "metrics.jsonl")
    assert rows[-1]["step"] == 12
    with open(b / "metrics.jsonl", "a") as f:  # rows written after the checkpoint, then a kill
        f.write(json.dumps({"step": 13, "train_loss": 0.0}) + "\n" + '{"step": 14, "tr')
    resumed = run(tmp_path / "b", corpus, *SHORT, *method)
    assert resumed["finished"] is True
    assert_same_weights(final_model(tmp_path / "a" / "run"), final_model(b))
    for key in ("final_train_loss", "final_val_loss", "final_val_loss_fixed"):
        assert straight[key] == resumed[key]
    timing = ("tokens_per_s", "elapsed_s")
    clean = [
        {k: v for k, v in r.items() if k not in timing}
        for r in read_metrics(tmp_path / "a" / "run" / "metrics.jsonl")
    ]
    assert clean == [
        {k: v for k, v in r.items() if k not in timing} for r in read_metrics(b / "metrics.jsonl")
    ]


def test_finished_run_is_skipped_and_other_configs_refused(tmp_path: Path, corpus: Path) -> None:
    first = run(tmp_path, corpus, *SHORT)
    final = tmp_path / "run" / "checkpoints" / "final.pt"
    mtime = final.stat().st_mtime_ns
    again = run(tmp_path, corpus, *SHORT, "threads=2")  # how it runs is not what it computes
    assert again == first and final.stat().st_mtime_ns == mtime
    with pytest.raises(ConfigError, match=r"different config \(train.steps: 24 -> 30\)"):
        run(tmp_path, corpus, "train.steps=30", "eval.every=8", "checkpoint.every=8")
    with pytest.raises(ConfigError, match="resume=never"):
        run(tmp_path, corpus, *SHORT, "resume=never")


def test_checkpoint_from_elsewhere_is_refused(tmp_path: Path, corpus: Path) -> None:
    run(tmp_path, corpus, *SHORT, "train.stop_at=8")
    latest = tmp_path / "run" / "checkpoints" / "latest.pt"
    state = load_checkpoint(latest)
    state["config_hash"] = "0" * 16
    torch.save(state, latest)
    with pytest.raises(CheckpointError, match="different config"):
        run(tmp_path, corpus, *SHORT)
    latest.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot load checkpoint"):
        run(tmp_path, corpus, *SHORT)


def test_wandb_offline_files_and_our_record(tmp_path: Path, corpus: Path, monkeypatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    summary = run(tmp_path, corpus, *SHORT, "logger=wandb", "logger.project=basis-tests")
    run_dir = tmp_path / "run"
    files = list((run_dir / "wandb").glob(f"offline-run-*-{summary['wandb_id']}/run-*.wandb"))
    assert len(files) == 1
    # wandb 0.31 writes offline runs only as this binary log; check it carries the summary.
    # Its writer is the separate wandb-core process, which on a loaded machine may still be
    # flushing when run.finish() has returned: allow it some seconds.
    deadline = time.monotonic() + 30
    while True:
        blob = files[0].read_bytes()
        if (b"final_val_loss" in blob and b"basis-tests" in blob) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert b"final_val_loss" in blob and b"basis-tests" in blob
    saved = json.loads((run_dir / "summary.json").read_text())
    assert saved["final_val_loss"] == summary["final_val_loss"] is not None
    config = (run_dir / "config.yaml").read_text()
    assert "project: basis-tests" in config and "name: wandb" in config


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("+train.nope=1", "unknown config key 'train.nope'"),  # added with +: our validation
        ("method.rank=0", "method.rank must be an integer >= 1, got 0"),
        ("method.rank=abc", "method.rank must be an integer >= 1, got 'abc'"),
        ("method.lam=1.5", "method.lam must be a number in [0, 1), got 1.5"),
        ("method.hashing=random", "method.hashing must be one of balanced, uniform, gaussian"),
        ("optim.lr=0", "optim.lr must be a number > 0, got 0"),
        ("model.n_head=3", "model.n_embd (16) must be divisible by model.n_head (3)"),
        ("train.block_size=64", "train.block_size=64 exceeds model.block_size=32"),
        ("eval.protocols=[paper,paper]", "eval.protocols must be a list drawn from"),
        ("progress=maybe", "progress must be one of auto, true, false"),
    ],
)
def test_config_errors_name_the_key(override: str, message: str, tmp_path: Path) -> None:
    cfg = compose_config([*smoke_overrides(tmp_path, tmp_path), "method=basis", override])
    with pytest.raises(ConfigError) as err:
        train.train(cfg)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_cli_errors_are_one_line_with_exit_status_2(tmp_path: Path, corpus: Path) -> None:
    (tmp_path / "not-data.txt").write_text("x")
    base = smoke_overrides(tmp_path, corpus)
    cases = {
        "train.nope=1": "unknown config key 'train.nope' (to add a new key use +train.nope=...)",
        "method=basis method.rank=0": "method.rank must be an integer >= 1, got 0",
        "method=basis method.layers=[nothing.here]": "'nothing.here' matches no nn.Linear",
        "method=sketchy": "Could not find 'method/sketchy'",
        f"data.dir={tmp_path}": "has no meta.json",  # the data package's DataError
    }
    with ThreadPoolExecutor(max_workers=len(cases)) as pool:  # subprocesses: mostly import time
        results = pool.map(lambda a: run_cli([*base, *a.split()], tmp_path), cases)
        procs = dict(zip(cases, results, strict=True))
    for args, expected in cases.items():
        proc = procs[args]
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2, (args, proc.stderr)
        assert len(lines) == 1 and lines[0].startswith("error: "), (args, proc.stderr)
        assert expected in lines[0], (args, lines[0])
        assert "Traceback" not in proc.stderr + proc.stdout


def test_cli_run_without_wandb_never_imports_it(tmp_path: Path, corpus: Path) -> None:
    proc = run_cli(
        smoke_overrides(tmp_path, corpus, *SHORT), tmp_path, python_flags=["-X", "importtime"]
    )
    assert proc.returncode == 0, proc.stderr
    assert "done |" in proc.stdout
    imported = [line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines()]
    assert "torch" in imported and not [m for m in imported if m.startswith("wandb")]
    again = run_cli(smoke_overrides(tmp_path, corpus, *SHORT), tmp_path)
    assert again.returncode == 0 and "already finished" in again.stdout


def test_gradient_accumulation_matches_the_larger_batch(tmp_path: Path, corpus: Path) -> None:
    common = ["train.steps=6", "eval.every=6", "checkpoint.every=6", "optim=sgd", "optim.lr=0.1"]
    big = run(tmp_path / "big", corpus, *common, "train.batch_size=4")
    accum = run(tmp_path / "acc", corpus, *common, "train.batch_size=2", "train.grad_accum=2")
    a, b = final_model(tmp_path / "big" / "run"), final_model(tmp_path / "acc" / "run")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
    assert big["tokens"] == accum["tokens"] == 6 * 4 * 32
    # (the paper protocol chunks validation by the training batch, so compare the fixed set)
    assert big["final_val_loss_fixed"] == pytest.approx(accum["final_val_loss_fixed"], abs=1e-4)
