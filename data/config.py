"""The `data` config node (configs/data/*.yaml) read into one typed, validated object.

Preparation and training both go through `DataConfig.from_node`, so paths and counts have a
single source of truth. Keys this package does not know are ignored: the trainer may keep its own
settings in the same node.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from data.errors import DataError

SOURCES = ("shakespeare", "fineweb_edu")


@dataclass(frozen=True)
class DataConfig:
    name: str
    source: str
    dir: Path  # absolute; a relative `dir` is taken relative to the current working directory
    vocab_size: int = 50257
    verify: bool = False
    dataset: str = "HuggingFaceFW/fineweb-edu"
    subset: str | None = "sample-10BT"
    split: str = "train"
    train_docs: int = 50000
    val_docs: int = 500
    val_overlaps_train: bool = False
    local_files: tuple[str, ...] | None = None
    num_proc: int | None = None

    @classmethod
    def from_node(cls, node: Any) -> DataConfig:
        """Accept an omegaconf DictConfig or any mapping with the keys of configs/data/*.yaml."""
        if isinstance(node, DataConfig):
            return node
        raw = _to_plain_dict(node)
        for key in ("name", "source", "dir"):
            if raw.get(key) in (None, ""):
                raise DataError(f"the data config lacks `{key}`; start from configs/data/*.yaml")
        if raw["source"] not in SOURCES:
            raise DataError(
                f"data.source={raw['source']!r} is unknown; use one of {', '.join(SOURCES)}"
            )
        fields = cls.__dataclass_fields__
        kwargs: dict[str, Any] = {k: raw[k] for k in fields if k in raw}
        kwargs["dir"] = Path(str(raw["dir"])).expanduser().absolute()
        files = kwargs.get("local_files")
        if files is not None:
            kwargs["local_files"] = (files,) if isinstance(files, str) else tuple(map(str, files))
        for key in ("vocab_size", "train_docs", "val_docs"):
            value = kwargs.get(key, fields[key].default)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise DataError(f"data.{key} must be a positive integer, got {value!r}")
        if kwargs.get("vocab_size", 50257) < 50257:
            raise DataError(
                f"data.vocab_size={kwargs['vocab_size']} cannot hold GPT-2 tokens; use 50257"
            )
        num_proc = kwargs.get("num_proc")
        if num_proc is not None and (
            isinstance(num_proc, bool) or not isinstance(num_proc, int) or num_proc < 1
        ):
            raise DataError(f"data.num_proc must be null or a positive integer, got {num_proc!r}")
        for key in ("verify", "val_overlaps_train"):
            if not isinstance(kwargs.get(key, False), bool):
                raise DataError(f"data.{key} must be true or false, got {kwargs[key]!r}")
        for key in ("name", "dataset", "split"):
            if key in kwargs and not isinstance(kwargs[key], str):
                raise DataError(f"data.{key} must be a string, got {kwargs[key]!r}")
        return cls(**kwargs)


def _to_plain_dict(node: Any) -> dict[str, Any]:
    try:
        if isinstance(node, DictConfig):
            raw = OmegaConf.to_container(node, resolve=True)
        elif isinstance(node, Mapping):
            # Plain dicts go through OmegaConf too, so ${oc.env:...} in `dir` resolves the same.
            raw = OmegaConf.to_container(OmegaConf.create(dict(node)), resolve=True)
        else:
            raise DataError(f"the data config must be a mapping, got {type(node).__name__}")
    except OmegaConfBaseException as e:
        raise DataError(f"cannot resolve the data config: {e}".replace("\n", " ")) from e
    assert isinstance(raw, dict)
    return {str(k): v for k, v in raw.items()}
