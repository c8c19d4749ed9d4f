"""What can go wrong while a run is alive, found before it costs anything where it can be.

* Unwritable run directory / too little disk: checked before the first step (``preflight``),
  rather than discovered at the first checkpoint, possibly hours in.
* Non-finite loss: ``NonFiniteLoss`` stops the run *before* the optimizer step, so the weights
  and the last checkpoint stay good; ``train.on_nan=skip`` drops such steps instead.
* Kills: checkpoints are atomic (trainer.atomic); a kill mid-write leaves a stray temp file,
  which ``remove_stale_temps`` deletes on the next start. ``BASIS_FAULT_CHECKPOINT_SLEEP``
  (seconds) widens the window between writing a checkpoint's temp file and renaming it, so
  fault-injection tests can land kills inside it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import torch


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or infinite (one line, names the step and the checkpoint)."""


class JobFailed(RuntimeError):
    """One job of a Hydra multirun failed; raised (not ``sys.exit``) so the sweep goes on."""


def fault_pause() -> None:
    """Test hook: sleep between writing a checkpoint's temp file and renaming it."""
    delay = os.environ.get("BASIS_FAULT_CHECKPOINT_SLEEP")
    if delay:
        time.sleep(float(delay))


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(run_dir: Path) -> None:
    """Raise OSError (one line) unless files can be created where ``run_dir`` is or will be.

    Probes the nearest existing directory, leaving nothing behind: a refused run must not leave
    a half-made run directory that the next attempt would take for a foreign one.
    """
    where = _existing_ancestor(run_dir)
    if not where.is_dir():
        raise OSError(f"run_dir {run_dir}: {where} is not a directory")
    try:
        with tempfile.TemporaryFile(dir=where) as f:
            f.write(b"basis")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise OSError(
            f"run_dir {run_dir} is not writable ({e.strerror or type(e).__name__} in {where})"
        ) from e


def checkpoint_bytes(model: torch.nn.Module, optim_name: str, momentum: float = 0.0) -> int:
    """About how large one checkpoint is: weights plus the optimizer's per-weight state."""
    weights = sum(
        t.numel() * t.element_size()
        for t in model.state_dict().values()
        if isinstance(t, torch.Tensor)
    )
    per_weight = 2 if optim_name == "adamw" else (1 if momentum > 0 else 0)
    return weights * (1 + per_weight)


def check_free_space(run_dir: Path, needed: int) -> None:
    """Raise OSError unless there is room for a checkpoint being replaced (old + new file)."""
    where = _existing_ancestor(run_dir)
    free = shutil.disk_usage(where).free
    if free < 2 * needed:
        raise OSError(
            f"run_dir {run_dir}: {free / 1e6:.1f} MB free, but checkpoints need about "
            f"{2 * needed / 1e6:.1f} MB (the old and the new one while it is replaced)"
        )


def remove_stale_temps(checkpoint_dir: Path) -> None:
    """Delete temp files of checkpoints whose writer was killed before the rename."""
    if checkpoint_dir.is_dir():
        for tmp in checkpoint_dir.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)
