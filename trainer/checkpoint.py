"""Checkpoints: written atomically, read back with ``torch.load(weights_only=True)``.

A checkpoint is a dict of tensors and plain Python values only (no pickled objects), so loading
one never runs code, and it holds everything an uninterrupted run would still have in memory:
model (BASIS sketch counters included, via the layers' extra state), optimizer, step, every RNG,
loader positions, the W&B run id and the config hash.
"""

from __future__ import annotations

import random
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer.atomic import atomic_file
from trainer.faults import fault_pause

FORMAT = "basis-train-checkpoint/1"


class CheckpointError(RuntimeError):
    """A one-line, user-facing checkpoint problem."""


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` so that ``path`` is always either the old or the new file."""
    try:
        with atomic_file(path, "wb") as f:
            torch.save({"format": FORMAT, **state}, f)
            fault_pause()
    except OSError as e:  # e.g. disk full: the temp file is gone, the old checkpoint is intact
        raise CheckpointError(
            f"cannot write checkpoint {path} ({e.strerror or e}); the previous one is kept"
        ) from e


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        with warnings.catch_warnings():  # e.g. "pickle protocol 4": noise on top of the one line
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, tampered or not a checkpoint at all
        raise CheckpointError(f"cannot load checkpoint {path}: {_load_failure(e)}") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a training checkpoint of format {FORMAT}")
    return state


def _load_failure(e: Exception) -> str:
    text = " ".join(str(e).split())
    if "Weights only load failed" in text:
        # torch's message is a paragraph of advice to load with weights_only=False: the one
        # thing not to do with a file that may have been altered. Keep only the cause.
        cause = text.split("WeightsUnpickler error:", 1)[-1].split(" Check the documentation")[0]
        return (
            f"refused by torch.load(weights_only=True) ({cause.strip()[:120]}); it is not a "
            "checkpoint written by train.py, or it was altered"
        )
    if isinstance(e, EOFError) or not text:
        return "the file is empty or truncated"
    return text[:200]


def capture_rng() -> dict[str, Any]:
    """Every global RNG, as tensors and plain values (numpy's key array becomes a tensor)."""
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "name": np_name,
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(
        (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
