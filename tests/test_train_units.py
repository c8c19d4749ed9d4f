"""The trainer's pieces on their own: run naming, config identity, schedule, metrics, checkpoint
files, RNG state, and W&B's fallbacks. Fast: no training."""

from __future__ import annotations

import json
import math
import pickle
import random
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers_train import compose_config

from trainer.checkpoint import (
    CheckpointError,
    capture_rng,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)
from trainer.config import ConfigError, config_hash, identity_diff, validate
from trainer.metrics import MetricsLog, read_metrics
from trainer.optim import lr_at
from trainer.run_dir import RunDir, method_tag, resolve_run_dir
from trainer.wandb_logger import NullLogger, has_credentials, make_logger, resolve_mode


def conf(*overrides: str) -> dict:
    return validate(compose_config(list(overrides)))


@pytest.mark.parametrize(
    ("overrides", "tag"),
    [
        ([], "exact"),
        (["method=basis"], "basis-r32"),
        (["method=basis", "method.rank=8", "method.invariant_scalars=false"], "basis-r8-noinv"),
        (["method=basis", "method.hashing=uniform"], "basis-r32-uniform"),
        (["method=basis", "method.rank=8", "method.hashing=gaussian"], "basis-r8-gaussian"),
        (["method=basis", "method.lam=0"], "basis-r32-lam0"),
        (["method=basis_all", "method.rank=16"], "basis-r16-all"),
        (["method=basis", "method.layers=[lm_head]"], "basis-r32-L"),
    ],
)
def test_method_tags(overrides: list[str], tag: str) -> None:
    assert method_tag(conf(*overrides)["method"]).startswith(tag)


def test_default_run_dir_and_override() -> None:
    assert resolve_run_dir(conf("method=basis", "seed=3")) == Path(
        "runs/paper-shakespeare/basis-r32-s3"
    )
    assert resolve_run_dir(conf("experiment=demo")) == Path("runs/demo/exact-s42")
    assert resolve_run_dir(conf("run_dir=/x/y")) == Path("/x/y")


def test_identity_ignores_how_a_run_executes() -> None:
    a = conf()
    b = conf("threads=1", "logger=none", "progress=false", "train.stop_at=10", "data.dir=/d")
    assert config_hash(a) == config_hash(b) and identity_diff(a, b) == []
    c = conf("optim.lr=0.02")
    assert identity_diff(a, c) == ["optim.lr: 0.01 -> 0.02"]
    assert config_hash(a) != config_hash(c)


def test_run_dirs_from_before_a_new_key_still_match() -> None:
    current = conf()
    saved = json.loads(json.dumps(current))
    del saved["eval"]["fixed_every"]  # written by code that evaluated both protocols together
    assert identity_diff(saved, conf("eval.fixed_every=1000")) == []
    assert identity_diff(saved, current) == ["eval.fixed_every: 1000 -> 5000"]


def test_validation_errors_are_single_lines() -> None:
    with pytest.raises(ConfigError, match=r"^train.stop_at=60000 is beyond train.steps=50000$"):
        conf("train.stop_at=60000")
    with pytest.raises(ConfigError, match="optim.betas must be a pair"):
        conf("optim=adamw", "optim.betas=[0.9]")
    with pytest.raises(ConfigError, match="dtype=bf16"):
        conf("dtype=bf16", "device=cpu")
    with pytest.raises(ConfigError, match="unknown config key 'method.rank'"):
        validate({**conf(), "method": {"name": "exact", "rank": 4}})


def test_lr_schedules() -> None:
    sgd = conf()["optim"]
    assert lr_at(1, sgd, 100) == lr_at(100, sgd, 100) == 0.01
    adamw = conf("optim=adamw", "optim.warmup_steps=10", "optim.min_lr=0.0001")["optim"]
    assert lr_at(5, adamw, 110) == pytest.approx(adamw["lr"] / 2)
    assert lr_at(10, adamw, 110) == pytest.approx(adamw["lr"])
    assert lr_at(60, adamw, 110) == pytest.approx((adamw["lr"] + 1e-4) / 2)
    assert lr_at(110, adamw, 110) == pytest.approx(1e-4)
    assert all(lr_at(s, adamw, 110) >= 1e-4 - 1e-12 for s in range(10, 111))


def test_metrics_are_cut_back_to_the_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path, keep_until_step=0)
    for step in range(1, 6):
        log.write({"step": step, "train_loss": float(step), "val_loss": math.nan})
    log.close()
    with open(path, "a") as f:
        f.write('{"step": 6, "tra')  # killed mid-line
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3, 4, 5]
    assert read_metrics(path)[0]["val_loss"] is None  # NaN is not JSON
    log = MetricsLog(path, keep_until_step=3)
    log.write({"step": 4, "train_loss": 40.0})
    log.close()
    rows = read_metrics(path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[-1]["train_loss"] == 40.0
    assert all(json.loads(line) for line in path.read_text().splitlines())


def test_checkpoints_are_atomic_and_loaded_weights_only(tmp_path: Path) -> None:
    path = tmp_path / "ckpt" / "latest.pt"
    save_checkpoint(path, {"step": 3, "w": torch.arange(4.0), "rng": capture_rng()})
    assert load_checkpoint(path)["step"] == 3
    assert [p.name for p in path.parent.iterdir()] == ["latest.pt"]  # no temp file left
    # A pickle that would run code on load is refused, not executed.
    path.write_bytes(
        pickle.dumps({"format": "basis-train-checkpoint/1", "x": Path("/")}, protocol=2)
    )
    with pytest.raises(CheckpointError, match="cannot load checkpoint"):
        load_checkpoint(path)
    torch.save({"step": 1}, path)
    with pytest.raises(CheckpointError, match="not a training checkpoint"):
        load_checkpoint(path)


def test_rng_state_round_trips_through_a_checkpoint(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    save_checkpoint(tmp_path / "c.pt", {"rng": capture_rng()})
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    restore_rng(load_checkpoint(tmp_path / "c.pt")["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_run_dir_refuses_a_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not a run directory"):
        RunDir(tmp_path).status(conf(), "auto")
    assert RunDir(tmp_path / "new").status(conf(), "auto") == "fresh"


LOGGER = {
    "name": "wandb",
    "mode": "offline",
    "project": "p",
    "entity": None,
    "group": "g",
    "tags": [],
}


def test_wandb_modes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_mode("online") == "disabled"
    assert isinstance(
        make_logger(LOGGER, run_dir=Path("."), run_id="x", name="n", config={}), NullLogger
    )
    monkeypatch.delenv("WANDB_MODE")
    assert resolve_mode("offline") == "offline"
    none = {"name": "none"}
    assert isinstance(
        make_logger(none, run_dir=Path("."), run_id="x", name="n", config={}), NullLogger
    )


@pytest.mark.parametrize("with_key", [False, True])
def test_wandb_online_falls_back_to_offline_fast(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, with_key: bool
) -> None:
    secret = "0123456789abcdef0123456789abcdef01234567"
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    if with_key:  # a key, but a server that refuses connections (port 9: discard, closed)
        monkeypatch.setenv("WANDB_API_KEY", secret)
        monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    assert has_credentials() == with_key
    start = time.perf_counter()
    logger = make_logger(
        LOGGER, run_dir=tmp_path / "run", run_id="fallback1", name="n", config={"a": 1}
    )
    logger.log({"loss": 1.0}, step=1)
    logger.finish()
    assert time.perf_counter() - start < 30
    err = capsys.readouterr()
    warnings = [line for line in err.err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "logging offline" in warnings[0]
    assert secret not in err.out + err.err
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*-fallback1/run-fallback1.wandb"))
