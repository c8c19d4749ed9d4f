"""Weights & Biases, or nothing: the trainer logs through ``Logger`` and never waits on a network.

``offline`` (the default) works with no account and writes ``<run_dir>/wandb/offline-run-*``;
upload later with ``wandb sync``. ``online`` is attempted only with credentials and a reachable
server, otherwise it falls back to offline with a one-line warning (wandb.init would otherwise
block for its whole init timeout). ``WANDB_MODE`` in the environment overrides the config.
wandb is imported only when it is used.
"""

from __future__ import annotations

import netrc
import os
import secrets
import socket
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

DEFAULT_BASE_URL = "https://api.wandb.ai"
PROBE_TIMEOUT_S = 3.0
ENV_MODES = {
    "online": "online",
    "run": "online",
    "offline": "offline",
    "dryrun": "offline",
    "disabled": "disabled",
}


class Logger(Protocol):
    def log(self, row: Mapping[str, Any], step: int) -> None: ...
    def summary(self, values: Mapping[str, Any]) -> None: ...
    def finish(self) -> None: ...


class NullLogger:
    def log(self, row: Mapping[str, Any], step: int) -> None:
        pass

    def summary(self, values: Mapping[str, Any]) -> None:
        pass

    def finish(self) -> None:
        pass


class WandbLogger:
    def __init__(self, run: Any) -> None:
        self.run = run
        # A custom x-axis instead of wandb's internal step: after a resume from an earlier
        # checkpoint, steps already sent are sent again, which wandb's own step would drop.
        run.define_metric("step")
        run.define_metric("*", step_metric="step")

    def log(self, row: Mapping[str, Any], step: int) -> None:
        self.run.log({**{k: v for k, v in row.items() if v is not None}, "step": step})

    def summary(self, values: Mapping[str, Any]) -> None:
        self.run.summary.update(dict(values))

    def finish(self) -> None:
        self.run.finish()


def new_run_id() -> str:
    """A W&B-compatible run id, chosen by us so it exists (and is checkpointed) even without W&B."""
    return secrets.token_hex(4)


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def resolve_mode(configured: str) -> str:
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if env:
        if env in ENV_MODES:
            return ENV_MODES[env]
        warn(f"ignoring WANDB_MODE={env!r} (not online, offline or disabled)")
    return configured


def _base_url() -> str:
    return os.environ.get("WANDB_BASE_URL", "").strip() or DEFAULT_BASE_URL


def has_credentials(base_url: str | None = None) -> bool:
    """An API key in the environment or in netrc for the server's host (never read out loud)."""
    if os.environ.get("WANDB_API_KEY", "").strip():
        return True
    host = urlparse(base_url or _base_url()).hostname or ""
    try:
        path = os.environ.get("NETRC") or None
        auth = netrc.netrc(path).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(auth and auth[2])


def server_reachable(base_url: str | None = None, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """A TCP connection to the server (or to the HTTPS proxy, if one is set) within ``timeout``."""
    url = base_url or _base_url()
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    if proxy and urlparse(url).scheme == "https":
        url = proxy if "://" in proxy else f"http://{proxy}"
    parsed = urlparse(url)
    host = parsed.hostname
    if not host:
        return False
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def make_logger(
    cfg: Mapping[str, Any],
    *,
    run_dir: Path,
    run_id: str,
    name: str,
    config: Mapping[str, Any],
    tags: list[str] | None = None,
) -> Logger:
    if cfg["name"] == "none":
        return NullLogger()
    mode = resolve_mode(cfg["mode"])
    if mode == "disabled":
        return NullLogger()
    if mode == "online":
        if not has_credentials():
            warn("W&B online needs an API key (WANDB_API_KEY or `wandb login`); logging offline")
            mode = "offline"
        elif not server_reachable():
            warn(f"W&B server {_base_url()} is unreachable; logging offline (`wandb sync` later)")
            mode = "offline"

    import wandb  # deferred: several hundred ms, and runs with logger=none never need it

    def init(mode: str) -> Any:
        return wandb.init(
            project=cfg["project"],
            entity=cfg["entity"],
            group=cfg["group"],
            name=name,
            tags=list(dict.fromkeys([*(tags or []), *cfg["tags"]])),
            config=dict(config),
            id=run_id,
            resume="allow",
            dir=str(run_dir),
            mode=mode,
            settings=wandb.Settings(console="off", silent=True, init_timeout=60),
        )

    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        run = init(mode)
    except Exception as e:  # wandb raises its own types; any failure here must not end the run
        if mode == "offline":
            raise
        warn(f"W&B online init failed ({type(e).__name__}); logging offline")
        run = init("offline")
        mode = "offline"
    where = run_dir / "wandb"
    hint = f"; upload later: wandb sync {where}/offline-run-*" if mode == "offline" else ""
    print(f"W&B {mode}: run {run_id} in {where}{hint}", flush=True)
    return WandbLogger(run)
