"""Where a run lives, derived from its config, and what state it is in.

``runs/<experiment_name>/<method tag>-s<seed>`` so that reruns find their directory and sweep jobs
never collide. Inside::

    config.yaml       the resolved config (the run's identity; see trainer.config.identity)
    metrics.jsonl     one JSON object per logged step
    checkpoints/      latest.pt while running, final.pt at the end
    summary.json      written last; "finished": true marks a complete run
    wandb/            offline W&B files, when W&B is on
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml

from trainer.atomic import atomic_write_text
from trainer.config import ConfigError, identity_diff

PAPER_LAYERS = ["transformer.h.*.mlp.c_fc", "transformer.h.*.mlp.c_proj", "lm_head"]
ALL_LAYERS = ["transformer.h.*", "lm_head"]
DEFAULTS = {"lam": 0.01, "scale": 1.0, "eps": 1e-8, "hashing": "balanced"}

Status = Literal["fresh", "resume", "finished"]


def method_tag(method: Mapping[str, Any]) -> str:
    """``exact`` or ``basis-r<R>`` plus a suffix for every setting off the paper's defaults,
    e.g. ``basis-r32-uniform``, ``basis-r8-noinv``, ``basis-r16-lam0``, ``basis-r8-all``."""
    if method["name"] != "basis":
        return str(method["name"])
    parts = [f"basis-r{method['rank']}"]
    if method["hashing"] != DEFAULTS["hashing"]:
        parts.append(str(method["hashing"]))
    if not method["invariant_scalars"]:
        parts.append("noinv")
    for key in ("lam", "scale", "eps"):
        if method[key] != DEFAULTS[key]:
            parts.append(f"{key}{method[key]:g}")
    layers = list(method["layers"])
    if layers == ALL_LAYERS:
        parts.append("all")
    elif layers != PAPER_LAYERS:
        parts.append("L" + hashlib.sha1(",".join(layers).encode()).hexdigest()[:6])
    return "-".join(parts)


def run_name(conf: Mapping[str, Any]) -> str:
    return f"{method_tag(conf['method'])}-s{conf['seed']}"


def resolve_run_dir(conf: Mapping[str, Any]) -> Path:
    if conf.get("run_dir"):
        return Path(conf["run_dir"])
    return Path("runs") / str(conf["experiment_name"]) / run_name(conf)


class RunDir:
    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.config_path = self.path / "config.yaml"
        self.metrics_path = self.path / "metrics.jsonl"
        self.summary_path = self.path / "summary.json"
        self.fixed_eval_path = self.path / "fixed_eval.json"  # trainer.stats.fixed_eval_record
        self.checkpoint_dir = self.path / "checkpoints"
        self.latest_path = self.checkpoint_dir / "latest.pt"
        self.final_path = self.checkpoint_dir / "final.pt"

    def read_config(self) -> dict[str, Any] | None:
        if not self.config_path.is_file():
            return None
        try:
            saved = yaml.safe_load(self.config_path.read_text())
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(
                f"{self.config_path} is unreadable ({type(e).__name__}); fix or delete it"
            ) from e
        if not isinstance(saved, dict):
            raise ConfigError(f"{self.config_path} is not a config mapping; fix or delete it")
        return saved

    def read_summary(self) -> dict[str, Any] | None:
        try:
            summary = json.loads(self.summary_path.read_text())
        except (OSError, ValueError):
            return None
        return summary if isinstance(summary, dict) else None

    def checkpoint(self) -> Path | None:
        """The checkpoint to resume from: final.pt (if the run died after writing it) or latest.pt."""
        for path in (self.final_path, self.latest_path):
            if path.is_file():
                return path
        return None

    def status(self, conf: Mapping[str, Any], resume: str) -> Status:
        """Decide what to do with this directory for config ``conf``; refuse what is unsafe."""
        saved = self.read_config()
        if saved is None:
            if self.path.exists() and any(self.path.iterdir()):
                raise ConfigError(
                    f"run_dir {self.path} exists, is not empty and has no config.yaml, so it is "
                    "not a run directory; choose another run_dir"
                )
            return "fresh"
        diff = identity_diff(saved, conf)
        if diff:
            more = f" (+{len(diff) - 3} more)" if len(diff) > 3 else ""
            raise ConfigError(
                f"run_dir {self.path} holds a run with a different config ({'; '.join(diff[:3])}"
                f"{more}); pass another run_dir= or experiment_name=, or delete that directory"
            )
        if resume == "never":
            raise ConfigError(
                f"run_dir {self.path} already holds this run and resume=never; "
                "use resume=auto to continue it, or delete the directory to start over"
            )
        summary = self.read_summary()
        if summary is not None and summary.get("finished") is True:
            return "finished"
        return "resume" if self.checkpoint() is not None else "fresh"

    def write_config(self, conf: Mapping[str, Any]) -> None:
        atomic_write_text(self.config_path, yaml.safe_dump(dict(conf), sort_keys=False))

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        atomic_write_text(self.summary_path, json.dumps(dict(summary), indent=2) + "\n")

    def write_fixed_eval(self, record: Mapping[str, Any]) -> None:
        atomic_write_text(self.fixed_eval_path, json.dumps(dict(record)) + "\n")


def git_commit() -> str | None:
    """HEAD of the repository this code runs from, with ``+dirty`` for uncommitted changes."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5
        )
        if head.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
