"""Data-parallel training under ``torchrun``: process group, rank roles, reductions.

    torchrun --nproc_per_node=2 train.py experiment=smoke logger=none          # 2 CPU processes
    torchrun --nnodes=2 --node_rank=0 --master_addr=HOST --nproc_per_node=8 train.py ...

Without torchrun's environment (``WORLD_SIZE`` unset or 1) nothing here starts a process group
and every helper is a no-op, so a single-process run is exactly what it was.

What a run means under DDP (``W`` ranks, per-rank ``train.batch_size`` ``B``, ``train.grad_accum``
``A``):

* **Global batch** = ``B × W × A`` rows of ``train.block_size`` tokens per optimizer step. Rank r
  reads rows ``[r·B, (r+1)·B)`` of every global chunk (``data.TrainLoader``), so W ranks see
  exactly the rows one process with ``batch_size = B·W`` sees, and an exact run matches it to
  float rounding. ``tokens`` in the metrics counts the global batch.
* **Roles**: rank 0 alone writes the run directory (config, metrics.jsonl, checkpoints,
  summary) and talks to W&B; it alone evaluates, on the unwrapped model (evaluation is cheap next
  to training here, and the validation stream's state then lives in one place). The other ranks
  wait at a barrier after each evaluation/checkpoint.
* **RNG**: every rank initialises the model from ``seed`` (identical weights; DDP also
  broadcasts rank 0's). Afterwards rank r > 0 re-seeds its global RNGs and its BASIS sketches
  from ``rank_seed(seed, r)``; rank 0 keeps ``seed``, so its stream is the single-process one.
  Checkpoints hold every rank's RNG state (gathered to rank 0); the sketch seeds are re-derived
  from the rank after loading, the call counters come from the checkpoint (equal on all ranks).
* **BASIS**: each rank sketches its own ``B`` rows with its own sketch, and DDP averages the
  estimated gradients. So ``method.rank`` R applies *per rank*: one optimizer step combines W
  independent rank-R sketches, i.e. a sketch with ``W·R`` rows over the global batch (the
  estimator's variance falls like that of one rank-``W·R`` sketch with W blocks).
* **Resume** restores every rank: the loader state is rank-independent (it records the world
  size, so resuming with another number of ranks is refused), and each rank takes its own RNG.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from basis.layer import mix_seed


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_info() -> DistInfo:
    """Rank, world size and local rank from torchrun's environment variables (1 process if unset)."""

    def read(name: str, default: int) -> int:
        raw = os.environ.get(name)
        if raw is None or raw == "":
            return default
        try:
            return int(raw)
        except ValueError:
            raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None

    world = read("WORLD_SIZE", 1)
    rank = read("RANK", 0)
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"RANK={rank} and WORLD_SIZE={world} do not describe a process group")
    return DistInfo(rank=rank, world_size=world, local_rank=read("LOCAL_RANK", rank))


def init_distributed(device_type: str) -> DistInfo:
    """Join torchrun's process group: NCCL when training on CUDA, gloo otherwise."""
    info = env_info()
    if not info.enabled or dist.is_initialized():
        return info
    backend = "nccl" if device_type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(info.local_rank)
    # A long timeout: rank 0 evaluates and checkpoints while the others wait at a barrier.
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=60))
    return info


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s own randomness; rank 0 keeps the run seed."""
    return seed if rank == 0 else mix_seed(seed, 0x5EED, rank)


def mean_over_ranks(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The mean of ``value`` over all ranks (in place; gloo has no AVG, so SUM and divide)."""
    if info.enabled:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= info.world_size
    return value


def gather_to_main(obj: Any, info: DistInfo) -> list[Any] | None:
    """Every rank's ``obj`` on rank 0 (a list by rank), None elsewhere; a collective."""
    if not info.enabled:
        return [obj]
    out: list[Any] | None = [None] * info.world_size if info.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast_from_main(obj: Any, info: DistInfo) -> Any:
    """Rank 0's ``obj`` on every rank; a collective."""
    if not info.enabled:
        return obj
    box = [obj if info.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class NullMetrics:
    """metrics.jsonl on ranks other than 0: rank 0 alone writes the run's record."""

    def write(self, row: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def wrap_ddp(
    model: torch.nn.Module,
    fwd_model: torch.nn.Module,
    device: torch.device,
    info: DistInfo,
    compile_model: bool,
) -> tuple[DistributedDataParallel | None, torch.nn.Module]:
    """(the DDP wrapper or None, the module training steps call).

    Single process: no wrapper, training calls ``fwd_model`` as before. Under DDP the wrapper's
    ``no_sync`` skips the all-reduce on all but the last micro-batch of an accumulated step.
    """
    if not info.enabled:
        return None, fwd_model
    ddp = DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None
    )
    return ddp, (torch.compile(ddp) if compile_model else ddp)
