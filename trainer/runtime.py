"""Where and how a run executes: threads, device, autocast, memory."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import resource
import sys
from contextlib import AbstractContextManager

import torch

from trainer.config import ConfigError

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter ids


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed blocks (up to 32 MiB each) for reuse instead of returning them to
    the OS. Each step allocates and frees several 12.8 MB tensors (the 64 x 50,257 logits, their
    gradient, the dense embedding gradient); by default each comes back as fresh pages, and
    faulting in and zeroing ~3,000 pages per tensor costs several ms per step on the CPU.
    Only changes when memory is returned, never results. Linux/glibc only; False elsewhere."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, 32 << 20) and mallopt(_M_TRIM_THRESHOLD, 1 << 30))


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def set_threads(threads: int | None) -> int:
    n = threads or available_cores()
    torch.set_num_threads(n)
    return n


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name} but CUDA is not available; use device=auto or cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"device={name} but only {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device=mps but MPS is not available; use device=auto or cpu")
    return device


def autocast_context(device: torch.device, dtype: str) -> AbstractContextManager:
    if dtype == "fp32":
        return contextlib.nullcontext()
    if device.type != "cuda":
        raise ConfigError(f"dtype={dtype} (autocast) is supported on CUDA only, not {device}")
    return torch.autocast(device_type="cuda", dtype=torch.bfloat16)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def peak_memory(device: torch.device) -> dict[str, int | str]:
    """On CUDA the allocator's peak (what the tensors needed); elsewhere the process's peak RSS."""
    if device.type == "cuda":
        return {
            "peak_memory_bytes": int(torch.cuda.max_memory_allocated(device)),
            "peak_memory_kind": "cuda_max_memory_allocated",
        }
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return {
        "peak_memory_bytes": int(rss if sys.platform == "darwin" else rss * 1024),
        "peak_memory_kind": "process_max_rss",
    }
