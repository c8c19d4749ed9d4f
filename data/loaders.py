"""Batches from a token array, with positions a checkpoint can save and restore exactly.

A chunk is rows·(T+1) consecutive tokens; row i of a chunk gives inputs row[:-1] and targets
row[1:] (the paper's protocol). Loader state is a dict of plain ints and strings and does not
depend on the rank, so rank 0's state restores every rank.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from data.errors import DataError

Batch = tuple[torch.Tensor, torch.Tensor]
ORDERS = ("sequential", "random")
PROTOCOLS = ("paper", "fixed")


def _positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise DataError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _as_tokens(tokens: Any) -> np.ndarray:
    array = tokens if isinstance(tokens, np.ndarray) else np.asarray(tokens)
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise DataError(f"tokens must be a 1-D integer array, got {array.dtype} {array.shape}")
    return array


def _to_batch(rows: np.ndarray) -> Batch:
    """(rows, T+1) token ids -> int64 inputs and targets of shape (rows, T)."""
    block = torch.from_numpy(rows.astype(np.int64))
    return block[:, :-1].contiguous(), block[:, 1:].contiguous()


def _next_chunk_start(position: int, chunk: int, n_tokens: int) -> int:
    """Where the chunk at `position` starts, wrapping to 0 when it would run past the end."""
    return 0 if position + chunk > n_tokens else position


def _restore(expected: dict[str, Any], state: dict[str, Any], what: str) -> None:
    for key, value in expected.items():
        if state.get(key) != value:
            raise DataError(
                f"cannot resume the {what}: the checkpoint has {key}={state.get(key)!r} but this "
                f"run has {value!r}; resume with the same data and batch settings"
            )


class TrainLoader:
    """Training batches (x, y), each int64 of shape (batch_size, block_size), on the CPU.

    `sequential`: consecutive non-overlapping chunks of batch_size·world_size rows of T+1 tokens,
    restarting at the start of the split when the next chunk would run past its end; rank r takes
    rows [r·batch_size, (r+1)·batch_size) of each chunk, so the ranks together see exactly what one
    process with the global batch sees.
    `random`: nanoGPT-style windows of T+1 tokens at offsets drawn from a generator seeded by
    (seed, step); rank r takes its rows of the global draw, with the same equivalence.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        batch_size: int,
        block_size: int,
        *,
        order: str = "sequential",
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.tokens = _as_tokens(tokens)
        self.batch_size = _positive("batch_size", batch_size)
        self.block_size = _positive("block_size", block_size)
        self.world_size = _positive("world_size", world_size)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < self.world_size:
            raise DataError(f"rank must be in [0, {self.world_size}), got {rank!r}")
        if order not in ORDERS:
            raise DataError(f"unknown loader order {order!r}; use one of {', '.join(ORDERS)}")
        self.order = order
        self.seed = int(seed)
        self.rank = rank
        self.global_rows = self.batch_size * self.world_size
        self.row_len = self.block_size + 1
        self.chunk = self.global_rows * self.row_len
        needed = self.chunk if order == "sequential" else self.row_len
        if len(self.tokens) < needed:
            raise DataError(
                f"the training split has {len(self.tokens)} tokens, fewer than one chunk of "
                f"{needed} ({order} order, {self.global_rows} rows of {self.row_len}); "
                "use a smaller batch or block size, or more data"
            )
        self.position = 0  # token offset of the next sequential chunk
        self.step = 0  # batches served so far

    def next_batch(self) -> Batch:
        if self.order == "sequential":
            start = _next_chunk_start(self.position, self.chunk, len(self.tokens))
            mine = start + self.rank * self.batch_size * self.row_len
            rows = np.asarray(self.tokens[mine : mine + self.batch_size * self.row_len])
            self.position = start + self.chunk
        else:
            rng = np.random.default_rng([self.seed, self.step])
            starts = rng.integers(0, len(self.tokens) - self.block_size, size=self.global_rows)
            mine = starts[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
            rows = np.stack([self.tokens[s : s + self.row_len] for s in mine])
        self.step += 1
        return _to_batch(rows.reshape(self.batch_size, self.row_len))

    def _identity(self) -> dict[str, Any]:
        return {
            "order": self.order,
            "seed": self.seed,
            "n_tokens": len(self.tokens),
            "batch_size": self.batch_size,
            "block_size": self.block_size,
            "world_size": self.world_size,
        }

    def state_dict(self) -> dict[str, Any]:
        return {**self._identity(), "position": self.position, "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _restore(self._identity(), state, "training loader")
        self.position = int(state["position"])
        self.step = int(state["step"])


class ValLoader:
    """Evaluation batches (x, y) of shape (batch_size, block_size), one chunk per batch.

    `paper`: each evaluation takes the next `num_chunks` chunks of a stream that continues
    across evaluations and wraps (the authors' protocol). `fixed`: the same first `num_chunks`
    chunks every time; `num_chunks` None or <= 0 means every whole chunk of the split.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        batch_size: int,
        block_size: int,
        *,
        protocol: str = "paper",
        num_chunks: int | None = 30,
    ) -> None:
        self.tokens = _as_tokens(tokens)
        self.batch_size = _positive("batch_size", batch_size)
        self.block_size = _positive("block_size", block_size)
        if protocol not in PROTOCOLS:
            raise DataError(f"unknown validation protocol {protocol!r}; use paper or fixed")
        self.protocol = protocol
        self.row_len = self.block_size + 1
        self.chunk = self.batch_size * self.row_len
        available = len(self.tokens) // self.chunk
        if available == 0:
            raise DataError(
                f"the validation split has {len(self.tokens)} tokens, fewer than one chunk of "
                f"{self.chunk} ({self.batch_size} rows of {self.row_len}); use a smaller batch "
                "or block size, or more validation data"
            )
        whole = num_chunks is None or num_chunks <= 0
        if whole and protocol == "paper":
            raise DataError("the paper validation protocol needs a positive num_chunks")
        self.num_chunks = available if whole else _positive("num_chunks", num_chunks)
        if protocol == "fixed" and self.num_chunks > available:
            raise DataError(
                f"the validation split has {available} chunks of {self.chunk} tokens, fewer than "
                f"num_chunks={self.num_chunks}; lower it, or use null for the whole split"
            )
        self.position = 0  # token offset where the next paper-protocol evaluation starts
        self.evaluations = 0

    def eval_batches(self) -> Iterator[Batch]:
        """The batches of one evaluation. The stream position advances on this call, not lazily,
        so an evaluation abandoned half-way still leaves a well-defined state."""
        starts = []
        position = self.position if self.protocol == "paper" else 0
        for _ in range(self.num_chunks):
            start = _next_chunk_start(position, self.chunk, len(self.tokens))
            starts.append(start)
            position = start + self.chunk
        if self.protocol == "paper":
            self.position = position
        self.evaluations += 1
        return (self._batch(s) for s in starts)

    def _batch(self, start: int) -> Batch:
        rows = np.asarray(self.tokens[start : start + self.chunk])
        return _to_batch(rows.reshape(self.batch_size, self.row_len))

    def __len__(self) -> int:
        return self.num_chunks

    def _identity(self) -> dict[str, Any]:
        return {
            "protocol": self.protocol,
            "n_tokens": len(self.tokens),
            "batch_size": self.batch_size,
            "block_size": self.block_size,
            "num_chunks": self.num_chunks,
        }

    def state_dict(self) -> dict[str, Any]:
        return {**self._identity(), "position": self.position, "evaluations": self.evaluations}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _restore(self._identity(), state, "validation loader")
        self.position = int(state["position"])
        self.evaluations = int(state["evaluations"])
