"""The on-disk format of prepared data, and the checks that make a damaged copy fail loudly.

A prepared directory holds `train.bin` and `val.bin` (flat little-endian uint16 GPT-2 token ids,
documents concatenated, each followed by <|endoftext|>) and `meta.json`. The directory is built
under a hidden staging name and renamed into place in one step, so a crash leaves either no
directory or a complete one; `meta.json` is what makes a directory count as prepared.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from data.cache import atomic_output, atomic_write_json, current_umask, sha256_file
from data.errors import DataError

FORMAT = "basis-tokens/1"
META_FILE = "meta.json"
TOKEN_DTYPE = np.dtype("<u2")
# Scanning for the largest id reads the whole file; below this many tokens (256 MiB) it is cheap
# next to a training run, above it only `verify` pays for it.
FULL_SCAN_MAX_TOKENS = 1 << 27


def write_tokens(path: Path, arrays: Iterable[np.ndarray]) -> dict[str, Any]:
    """Write the concatenation of `arrays` to `path` atomically; return its size, hash and max id."""
    digest = hashlib.sha256()
    tokens = 0
    max_token = -1
    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        for array in arrays:
            a = np.asarray(array)
            if a.size == 0:
                continue
            lo, hi = int(a.min()), int(a.max())
            if lo < 0 or hi > np.iinfo(TOKEN_DTYPE).max:
                raise DataError(f"token id {hi if lo >= 0 else lo} does not fit in uint16")
            raw = a.astype(TOKEN_DTYPE, copy=False).tobytes()
            f.write(raw)
            digest.update(raw)
            tokens += a.size
            max_token = max(max_token, hi)
    return {
        "file": path.name,
        "tokens": tokens,
        "sha256": digest.hexdigest(),
        "max_token": max_token,
    }


class TargetAppeared(FileExistsError):
    """Another process renamed its complete preparation into place before we could."""


@contextmanager
def staging_directory(target: Path) -> Iterator[Path]:
    """A fresh hidden directory beside `target`, renamed onto it when the block succeeds.

    Raises TargetAppeared if `target` appeared meanwhile (another process prepared it).
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        yield staging
        os.chmod(staging, 0o777 & ~current_umask())  # mkdtemp makes 0700; prepared data is shared
        try:
            # rename(2) replaces only a missing or empty directory, never prepared data.
            os.rename(staging, target)
        except OSError as e:
            raise TargetAppeared(f"{target} appeared while preparing") from e
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_meta(directory: Path, meta: dict[str, Any]) -> None:
    atomic_write_json(directory / META_FILE, {"format": FORMAT, **meta})


def read_meta(directory: Path | str) -> dict[str, Any]:
    directory = Path(directory)
    path = directory / META_FILE
    if not directory.is_dir():
        raise DataError(
            f"no prepared data at {directory}; run `python -m data.prepare data=<name>` "
            "or check data.dir"
        )
    if not path.is_file():
        raise DataError(
            f"{directory} has no {META_FILE}, so it is not prepared data (or preparation was "
            "interrupted); delete it or point data.dir elsewhere, then prepare again"
        )
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{path} is unreadable ({e}); delete {directory} and prepare again") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise DataError(f"{path} is not in format {FORMAT}; delete {directory} and prepare again")
    return meta


def check_params(directory: Path, meta: dict[str, Any], expected: dict[str, Any]) -> None:
    """Refuse prepared data that was made from different settings than the config asks for."""
    found = meta.get("params", {})
    keys = sorted(k for k in set(found) | set(expected) if found.get(k) != expected.get(k))
    if keys:
        was = ", ".join(f"{k}={found.get(k)!r}" for k in keys)
        asked = ", ".join(f"{k}={expected.get(k)!r}" for k in keys)
        raise DataError(
            f"{directory} was prepared with {was} but the config asks for {asked}; "
            "set data.dir to another directory, or delete this one to prepare it again"
        )


def split_info(directory: Path, meta: dict[str, Any], split: str) -> dict[str, Any]:
    splits = meta.get("splits", {})
    if split not in splits:
        raise DataError(f"{directory} has no split {split!r}; it has {', '.join(sorted(splits))}")
    return splits[split]


def validate_split(
    directory: Path, meta: dict[str, Any], split: str, *, vocab_size: int, verify: bool
) -> Path:
    """Check one split's file against meta.json; return its path. Hashes only when `verify`."""
    info = split_info(directory, meta, split)
    path = directory / info["file"]
    again = f"delete {directory} and prepare again"
    if not path.is_file():
        raise DataError(f"{path} is missing; {again}")
    size = path.stat().st_size
    if size % TOKEN_DTYPE.itemsize:
        raise DataError(f"{path} has {size} bytes, not a whole number of uint16 tokens; {again}")
    if size // TOKEN_DTYPE.itemsize != info["tokens"]:
        raise DataError(
            f"{path} holds {size // TOKEN_DTYPE.itemsize} tokens but {META_FILE} says "
            f"{info['tokens']}; {again}"
        )
    if info["tokens"] == 0:
        raise DataError(f"{path} is empty; prepare with more documents")
    n_vocab = meta.get("tokenizer", {}).get("n_vocab", 0)
    if n_vocab > vocab_size or info["max_token"] >= vocab_size:
        raise DataError(
            f"{path} holds token ids up to {max(n_vocab - 1, info['max_token'])} but the "
            f"vocabulary size is {vocab_size}; use data prepared with the GPT-2 tokenizer"
        )
    if verify and sha256_file(path) != info["sha256"]:
        raise DataError(f"{path} does not match the sha256 in {META_FILE}; {again}")
    return path


def load_split(
    directory: Path | str, split: str, *, vocab_size: int = 50257, verify: bool = False
) -> np.ndarray:
    """The token ids of `split` as a read-only uint16 memmap, after the integrity checks.

    Cheap checks always run (file present, whole uint16s, token count and tokenizer as in
    meta.json, largest id below `vocab_size` for files up to 2**27 tokens); `verify` adds the
    sha256 and the id scan for larger files.
    """
    directory = Path(directory)
    meta = read_meta(directory)
    path = validate_split(directory, meta, split, vocab_size=vocab_size, verify=verify)
    tokens = np.memmap(path, dtype=TOKEN_DTYPE, mode="r")
    if verify or tokens.size <= FULL_SCAN_MAX_TOKENS:
        largest = int(tokens.max())
        if largest >= vocab_size:
            raise DataError(
                f"{path} holds token id {largest} >= vocabulary size {vocab_size}; "
                f"the file is damaged: delete {directory} and prepare again"
            )
    return tokens
