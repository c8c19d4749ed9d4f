"""Shared fixtures for the training tests: a tiny prepared corpus and config composition."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from data.config import DataConfig
from data.shakespeare import params as shakespeare_params
from data.storage import write_meta, write_tokens

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


def make_corpus(root: Path, n_train: int = 40_000, n_val: int = 8_000, seed: int = 0) -> Path:
    """A prepared data directory in the real on-disk format holding a learnable toy language:
    a noisy walk over 64 GPT-2 ids (ids 1000..1063), so a tiny model's loss falls fast."""
    directory = root / "corpus"
    if (directory / "meta.json").exists():
        return directory
    directory.mkdir(parents=True)
    rng = np.random.default_rng(seed)

    def walk(n: int) -> np.ndarray:
        steps = rng.choice([1, 1, 1, 2, 5], size=n)
        return 1000 + np.cumsum(steps) % 64

    config = DataConfig.from_node(_data_node(directory))
    splits = {}
    for split, n in (("train", n_train), ("val", n_val)):
        splits[split] = write_tokens(directory / f"{split}.bin", [walk(n)])
    write_meta(
        directory,
        {
            "name": "shakespeare",
            "source": "shakespeare",
            "params": shakespeare_params(config, "gpt2"),
            "tokenizer": {"name": "gpt2", "n_vocab": 50257, "eot": 50256},
            "dtype": "uint16",
            "splits": splits,
        },
    )
    return directory


def _data_node(directory: Path) -> dict:
    return {"name": "shakespeare", "source": "shakespeare", "dir": str(directory)}


def compose_config(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIGS)):
        return compose(config_name="config", overrides=overrides)


def smoke_overrides(tmp_path: Path, corpus: Path, *extra: str) -> list[str]:
    return [
        "experiment=smoke",
        "logger=none",
        "progress=false",
        f"data.dir={corpus}",
        f"run_dir={tmp_path / 'run'}",
        "threads=1",
        *extra,
    ]


def run_cli(
    args: list[str], cwd: Path, timeout: float = 120, python_flags: list[str] | None = None
) -> subprocess.CompletedProcess:
    """``python train.py args`` in a fresh process, as a user would run it."""
    env = {**os.environ, "WANDB_MODE": os.environ.get("WANDB_MODE", "offline")}
    env.pop("HYDRA_FULL_ERROR", None)
    env.pop("BASIS_TRACEBACK", None)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, *(python_flags or []), str(REPO / "train.py"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
