"""Prepare a dataset once, or confirm that it is prepared: `prepare_data(cfg.data)`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import tiktoken

from data.config import DataConfig
from data.errors import DataError
from data.storage import (
    META_FILE,
    TargetAppeared,
    check_params,
    read_meta,
    staging_directory,
    validate_split,
    write_meta,
)
from data.tokenizer import get_gpt2_encoding

SPLITS = ("train", "val")


def _source_module(source: str) -> Any:
    # Imported on demand: `datasets` takes seconds to import and only FineWeb needs it.
    if source == "shakespeare":
        from data import shakespeare

        return shakespeare
    from data import fineweb

    return fineweb


def _check_prepared(directory: Path, config: DataConfig, expected: dict[str, Any]) -> None:
    meta = read_meta(directory)
    check_params(directory, meta, expected)
    for split in SPLITS:
        validate_split(directory, meta, split, vocab_size=config.vocab_size, verify=config.verify)


def prepare_data(cfg: Any, *, encoding: tiktoken.Encoding | None = None) -> Path:
    """Return the prepared directory for the `data` config node, preparing it if missing.

    Idempotent: prepared data made with the same settings is checked (cheaply, or by sha256 with
    `verify`) and left untouched. Data prepared with other settings, or a non-empty directory
    without meta.json, is never overwritten: that is a DataError naming the way out.
    `encoding` replaces GPT-2 (the tests use a tiny byte-level one); it is recorded in meta.json.
    """
    config = DataConfig.from_node(cfg)
    source = _source_module(config.source)
    tokenizer_name = encoding.name if encoding is not None else "gpt2"
    expected = source.params(config, tokenizer_name)
    target = config.dir
    if (target / META_FILE).exists():
        _check_prepared(target, config, expected)
        return target
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise DataError(
            f"{target} exists but has no {META_FILE}, so it is not prepared data (or an old "
            "preparation was interrupted); move it away or set data.dir to a new directory"
        )
    enc = encoding if encoding is not None else get_gpt2_encoding()
    print(f"preparing {config.name} ({config.source}) into {target}", flush=True)
    try:
        with staging_directory(target) as staging:
            built = source.build(config, staging, enc)
            write_meta(
                staging,
                {
                    "name": config.name,
                    "source": config.source,
                    "params": expected,
                    "tokenizer": {"name": enc.name, "n_vocab": enc.n_vocab, "eot": enc.eot_token},
                    "dtype": "uint16",
                    **built,
                },
            )
    except TargetAppeared:
        pass  # another process finished first; its result is checked below like ours
    _check_prepared(target, config, expected)
    return target


def describe(directory: Path) -> str:
    meta = read_meta(directory)
    parts = [f"{s} {meta['splits'][s]['tokens']:,} tokens" for s in SPLITS]
    return f"{directory}: {', '.join(parts)}"
