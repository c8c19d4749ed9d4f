"""Faults: kill -9 at random moments (also mid-checkpoint), non-finite losses, full/unwritable disks."""

from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import sys
import time
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from helpers_train import REPO, compose_config, make_corpus, smoke_overrides

import model as model_pkg
import train
from trainer import checkpoint as checkpoint_mod
from trainer import faults
from trainer.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from trainer.faults import NonFiniteLoss
from trainer.metrics import read_metrics

FAST = ["train.steps=12", "eval.every=12", "checkpoint.every=4", "eval.at_start=false"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("data"))


def run(tmp_path: Path, corpus: Path, *extra: str) -> dict:
    return train.train(compose_config(smoke_overrides(tmp_path, corpus, *extra)))


# ---- kill -9 ------------------------------------------------------------------------------------

KILL_RUN = ["train.steps=40", "eval.every=20", "checkpoint.every=4", "eval.at_start=false"]


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 60) -> bool:
    """Poll until ``predicate()``; False if the process ended first."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.005)
    raise TimeoutError("the training process made no progress")


@pytest.mark.slow
def test_kill_9_at_random_moments_then_resume_is_bit_identical(
    tmp_path: Path, corpus: Path
) -> None:
    reference = run(tmp_path / "ref", corpus, *KILL_RUN)
    run_dir = tmp_path / "run"
    ckpt_dir = run_dir / "checkpoints"
    env = {**os.environ, "PYTHONPATH": str(REPO), "BASIS_FAULT_CHECKPOINT_SLEEP": "0.3"}
    env.pop("BASIS_TRACEBACK", None)
    cmd = [sys.executable, str(REPO / "train.py"), *smoke_overrides(tmp_path, corpus, *KILL_RUN)]
    rng = random.Random(20260416)
    kills, in_checkpoint, resumed_from = 0, 0, []
    for attempt in range(6):
        proc = subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        if attempt % 2 == 0:  # while a checkpoint's temp file is written, before its rename
            hit = _wait_for(lambda: any(ckpt_dir.glob(".*.tmp")), proc)
            time.sleep(rng.uniform(0.0, 0.2))
        else:  # between steps: a random number of steps past where this attempt started
            start = len(read_metrics(run_dir / "metrics.jsonl"))
            target = start + rng.randint(1, 6)
            hit = _wait_for(
                lambda n=target: len(read_metrics(run_dir / "metrics.jsonl")) >= n, proc
            )
            time.sleep(rng.uniform(0.0, 0.03))
        if hit and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
            in_checkpoint += attempt % 2 == 0
        out, err = proc.communicate(timeout=60)
        assert "cannot load checkpoint" not in err and "Traceback" not in err, err
        resumed_from += [line for line in out.splitlines() if "resuming from" in line]
        if proc.returncode == 0:
            break
        assert proc.returncode == -signal.SIGKILL, err
        # What a kill leaves behind is the old checkpoint or the new one, never a torn one.
        if (ckpt_dir / "latest.pt").exists():
            assert load_checkpoint(ckpt_dir / "latest.pt")["step"] % 4 == 0
    else:  # out of attempts: let it finish undisturbed
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
    print(f"survived {kills} kills ({in_checkpoint} mid-checkpoint); {resumed_from}")
    assert kills >= 4 and in_checkpoint >= 2
    assert not list(ckpt_dir.glob(".*.tmp"))  # stray temp files were cleaned up
    a = load_checkpoint(tmp_path / "ref" / "run" / "checkpoints" / "final.pt")["model"]
    b = load_checkpoint(ckpt_dir / "final.pt")["model"]
    for k in a:
        assert torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k], k
    steps = [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")]
    assert steps == list(range(1, 41))  # every step logged exactly once
    final_rows = read_metrics(tmp_path / "ref" / "run" / "metrics.jsonl")
    assert final_rows[-1]["train_loss"] == read_metrics(run_dir / "metrics.jsonl")[-1]["train_loss"]
    assert reference["finished"]


# ---- non-finite loss ----------------------------------------------------------------------------


def nan_model(monkeypatch: pytest.MonkeyPatch, at_calls: set[int]) -> None:
    """Make train.py's GPT return a NaN loss on the given training forward calls (1-based)."""
    calls = [0]

    class NanGPT(model_pkg.GPT):
        def forward(self, idx, targets=None):  # noqa: ANN001, ANN202 - mirrors GPT.forward
            logits, loss = super().forward(idx, targets)
            if self.training and loss is not None:
                calls[0] += 1
                if calls[0] in at_calls:
                    loss = loss * float("nan")
            return logits, loss

    monkeypatch.setattr(train, "GPT", NanGPT)


def test_nan_stops_naming_the_step_and_the_kept_checkpoint_then_skip_resumes(
    tmp_path: Path, corpus: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    nan_model(monkeypatch, {7})
    with pytest.raises(NonFiniteLoss) as err:
        run(tmp_path, corpus, *FAST)
    latest = tmp_path / "run" / "checkpoints" / "latest.pt"
    line = train._one_line(err.value)
    assert "non-finite training loss (nan) at step 7" in line and "\n" not in str(err.value)
    assert f"last good checkpoint: {latest} (step 4)" in line and "train.on_nan=skip" in line
    assert load_checkpoint(latest)["step"] == 4  # kept, and good

    nan_model(monkeypatch, {3})  # the resumed process: its 3rd step is step 7 again
    summary = run(tmp_path, corpus, *FAST, "train.on_nan=skip")
    assert summary["finished"] and summary["skipped_steps"] == 1
    rows = {r["step"]: r for r in read_metrics(tmp_path / "run" / "metrics.jsonl")}
    assert rows[6]["skipped_steps"] == 0 and rows[7]["skipped_steps"] == 1
    assert rows[7]["train_loss"] is None  # NaN is written as null
    weights = load_checkpoint(tmp_path / "run" / "checkpoints" / "final.pt")["model"]
    assert all(torch.isfinite(w).all() for w in weights.values() if isinstance(w, torch.Tensor))


def test_a_skipped_step_leaves_weights_and_optimizer_untouched(
    tmp_path: Path, corpus: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    few = ["train.steps=8", "eval.every=8", "checkpoint.every=8", "eval.at_start=false"]
    run(tmp_path / "a", corpus, *few, "train.stop_at=2")
    nan_model(monkeypatch, {1, 2})
    summary = run(tmp_path / "b", corpus, *few, "train.on_nan=skip", "train.stop_at=2")
    assert summary == {"finished": False, "steps": 2}
    b = load_checkpoint(tmp_path / "b" / "run" / "checkpoints" / "latest.pt")
    assert b["skipped_steps"] == 2 and b["optimizer"]["state"] == {}  # AdamW never stepped
    a = load_checkpoint(tmp_path / "a" / "run" / "checkpoints" / "latest.pt")
    changed = [
        k
        for k, w in a["model"].items()
        if isinstance(w, torch.Tensor) and not torch.equal(w, b["model"][k])
    ]
    assert changed  # a normal run moved the weights; the skipping one kept the initial ones


# ---- disk ---------------------------------------------------------------------------------------


def test_unwritable_run_dir_fails_before_training(tmp_path: Path, corpus: Path) -> None:
    (tmp_path / "a-file").write_text("x")
    cfg = compose_config(
        [*smoke_overrides(tmp_path, corpus, *FAST), f"run_dir={tmp_path / 'a-file' / 'run'}"]
    )
    with pytest.raises(OSError, match=r"a-file is not a directory"):
        train.train(cfg)
    if os.geteuid() != 0:  # root writes anywhere; the permission case needs a normal user
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        cfg = compose_config([*smoke_overrides(tmp_path, corpus), f"run_dir={locked / 'run'}"])
        with pytest.raises(OSError, match="is not writable"):
            train.train(cfg)


def test_too_little_disk_fails_before_training(
    tmp_path: Path, corpus: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(faults.shutil, "disk_usage", lambda _: usage(10**9, 10**9 - 10**6, 10**6))
    with pytest.raises(OSError, match=r"1\.0 MB free, but checkpoints need about 38\.8 MB"):
        run(tmp_path, corpus, *FAST)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # no step was taken


def test_disk_full_mid_checkpoint_keeps_the_previous_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "checkpoints" / "latest.pt"
    save_checkpoint(path, {"step": 4, "w": torch.ones(3)})

    def full_disk(obj, f) -> None:  # noqa: ANN001 - torch.save's signature
        f.write(b"PK\x03\x04 half a zip")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_mod.torch, "save", full_disk)
    with pytest.raises(CheckpointError, match=r"No space left on device\); the previous one"):
        save_checkpoint(path, {"step": 8, "w": torch.zeros(3)})
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 4
    assert [p.name for p in path.parent.iterdir()] == ["latest.pt"]  # no half-written temp file
