"""FineWeb-edu prepared as in the paper: documents in stream order, GPT-2 + <|endoftext|> each.

Training documents are the first `train_docs` of the stream (the paper's training stream).
Validation is the next `val_docs` (disjoint, this project's default) or, with
`val_overlaps_train`, the first `val_docs` (what the authors' script does). The same code reads
local parquet / jsonl files with a `text` column, for air-gapped machines and for the tests.
"""

from __future__ import annotations

import glob
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import tiktoken

from data.config import DataConfig
from data.errors import DataError
from data.storage import write_tokens

_BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json"}
_WAYS_OUT = (
    "connect to the internet, or set data.local_files to parquet/jsonl files with a `text` "
    "column (e.g. a downloaded copy of the dataset's sample/10BT/*.parquet)"
)


def resolve_local_files(patterns: tuple[str, ...]) -> list[Path]:
    """Expand globs (sorted, since stream order is document order); every entry must match."""
    files: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(os.path.expanduser(pattern)))
        if not matches:
            raise DataError(f"data.local_files entry {pattern!r} matches no file")
        files.extend(Path(m).absolute() for m in matches)
    return files


def _builder(files: list[Path]) -> str:
    kinds = set()
    for path in files:
        suffixes = [s for s in path.suffixes if s not in (".gz", ".bz2", ".xz", ".zst")]
        kind = _BUILDERS.get(suffixes[-1] if suffixes else "")
        if kind is None:
            raise DataError(f"{path} is neither .parquet nor .jsonl; convert it to one of those")
        kinds.add(kind)
    if len(kinds) > 1:
        raise DataError("data.local_files mixes parquet and jsonl; use one format")
    return kinds.pop()


def params(config: DataConfig, tokenizer: str) -> dict[str, Any]:
    """What identifies a preparation: a different value means different token files.

    Local files stand for a copy of `dataset`/`subset`/`split`, so where the documents came from
    is recorded in meta.json (`origin`) but not compared: data prepared from local files stays
    usable after they are removed.
    """
    return {
        "source": "fineweb_edu",
        "dataset": config.dataset,
        "subset": config.subset,
        "split": config.split,
        "train_docs": config.train_docs,
        "val_docs": config.val_docs,
        "val_overlaps_train": config.val_overlaps_train,
        "tokenizer": tokenizer,
    }


def origin(config: DataConfig) -> dict[str, Any]:
    if config.local_files:
        files = resolve_local_files(config.local_files)
        return {"local_files": [{"name": p.name, "bytes": p.stat().st_size} for p in files]}
    return {"hub": config.dataset, "subset": config.subset, "split": config.split}


def document_ranges(config: DataConfig) -> dict[str, tuple[int, int]]:
    """[start, stop) stream positions of each split's documents."""
    train = (0, config.train_docs)
    if config.val_overlaps_train:
        return {"train": train, "val": (0, config.val_docs)}
    return {"train": train, "val": (config.train_docs, config.train_docs + config.val_docs)}


def open_stream(config: DataConfig) -> datasets.IterableDataset:
    if config.local_files:
        files = resolve_local_files(config.local_files)
        return datasets.load_dataset(
            _builder(files), data_files=[str(p) for p in files], split="train", streaming=True
        )
    print(
        f"streaming {config.dataset} ({config.subset}, {config.split}) from the Hugging Face hub",
        flush=True,
    )
    try:
        return datasets.load_dataset(
            config.dataset, name=config.subset, split=config.split, streaming=True
        )
    except Exception as e:  # the hub client raises many types; all mean the same to the user
        raise DataError(f"cannot stream {config.dataset}: {_first_line(e)}; {_WAYS_OUT}") from e


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def _texts(stream: datasets.IterableDataset, n: int, source: str) -> Iterator[dict[str, str]]:
    iterator = iter(stream)
    for index in range(n):
        try:
            row = next(iterator)
        except StopIteration:
            raise DataError(
                f"{source} ends after {index} documents but {n} are needed; "
                "lower data.train_docs / data.val_docs"
            ) from None
        except Exception as e:  # network or decoding failures surface lazily while streaming
            raise DataError(f"reading {source} failed: {_first_line(e)}; {_WAYS_OUT}") from e
        text = row.get("text")
        if not isinstance(text, str):
            columns = ", ".join(sorted(row))
            raise DataError(
                f"document {index} of {source} has no string `text` column (columns: {columns}); "
                "local files must have one"
            )
        yield {"text": text}


def _unwrap_data_error(e: BaseException) -> DataError | None:
    """datasets wraps exceptions raised in a generator; find ours again."""
    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, DataError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def materialize(config: DataConfig, n: int, work_dir: Path) -> datasets.Dataset:
    """The first `n` documents of the stream as an on-disk Dataset (only the `text` column)."""
    source = ", ".join(config.local_files) if config.local_files else config.dataset
    stream = open_stream(config)
    try:
        return datasets.Dataset.from_generator(
            _texts,
            gen_kwargs={"stream": stream, "n": n, "source": source},
            features=datasets.Features({"text": datasets.Value("string")}),
            cache_dir=str(work_dir),
            # A fixed fingerprint skips hashing the stream; work_dir is fresh, so nothing stale.
            fingerprint="basis-documents",
        )
    except Exception as e:
        ours = _unwrap_data_error(e)
        if ours is not None:
            raise ours from e
        raise


class _Tokenize:
    """Picklable batch function for `Dataset.map`, so it can run in worker processes."""

    def __init__(self, encoding: tiktoken.Encoding) -> None:
        self.encoding = encoding

    def __call__(self, batch: dict[str, list[str]]) -> dict[str, list[list[int]]]:
        # Workers are processes already; tiktoken's own thread pool would oversubscribe cores.
        ids = self.encoding.encode_ordinary_batch(batch["text"], num_threads=1)
        eot = self.encoding.eot_token
        return {"ids": [[*doc, eot] for doc in ids]}


def _token_feature() -> datasets.Features:
    list_type = getattr(datasets, "List", None) or datasets.Sequence  # List is datasets >= 4
    return datasets.Features({"ids": list_type(datasets.Value("uint16"))})


def tokenize(
    docs: datasets.Dataset, encoding: tiktoken.Encoding, num_proc: int | None
) -> datasets.Dataset:
    workers = num_proc if num_proc is not None else min(8, os.cpu_count() or 1)
    return docs.map(
        _Tokenize(encoding),
        batched=True,
        batch_size=256,
        num_proc=workers if workers > 1 else None,
        remove_columns=["text"],
        features=_token_feature(),
        desc="tokenizing with GPT-2",
        load_from_cache_file=False,
        new_fingerprint="basis-gpt2-tokens",
    )


def _token_arrays(tokens: datasets.Dataset, start: int, stop: int) -> Iterator[np.ndarray]:
    part = tokens.select(range(start, stop)).with_format("arrow")
    for table in part.iter(batch_size=1024):
        # flatten() (unlike .values) honours the slice offsets of the list array.
        yield table.column("ids").combine_chunks().flatten().to_numpy(zero_copy_only=False)


def build(config: DataConfig, staging: Path, encoding: tiktoken.Encoding) -> dict[str, Any]:
    """Write train.bin and val.bin into `staging`; return the split part of meta.json."""
    ranges = document_ranges(config)
    needed = max(stop for _, stop in ranges.values())
    work_dir = staging / ".work"
    try:
        docs = materialize(config, needed, work_dir)
        tokens = tokenize(docs, encoding, config.num_proc)
        splits = {}
        for split, (start, stop) in ranges.items():
            info = write_tokens(staging / f"{split}.bin", _token_arrays(tokens, start, stop))
            splits[split] = {**info, "documents": {"start": start, "stop": stop}}
    finally:
        # The arrow caches are scratch; they must not be renamed into the prepared directory.
        shutil.rmtree(work_dir, ignore_errors=True)
    return {"splits": splits, "origin": origin(config)}
