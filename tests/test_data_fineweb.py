"""FineWeb-edu preparation on local fixtures (no hub): ranges, validation modes, eot placement,
idempotence, atomicity and the offline error."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tiktoken

from data import DataError, load_split, prepare_data
from data import fineweb as fineweb_module
from data import storage as storage_module
from data.cache import sha256_file

EOT = 256


@pytest.fixture(scope="module")
def byte_encoding() -> tiktoken.Encoding:
    # Tokens are the UTF-8 bytes, so expected ids follow from the text alone; the GPT-2 ids are
    # tested in test_data_assets.py.
    return tiktoken.Encoding(
        name="bytes-test",
        pat_str=r"[\s\S]",
        mergeable_ranks={bytes([i]): i for i in range(256)},
        special_tokens={"<|endoftext|>": EOT},
    )


def make_docs(n: int, offset: int = 0) -> list[str]:
    # Varying lengths, non-ASCII, and a literal end-of-text string that must stay text.
    return [f"doc {offset + i}: " + "é" * (i % 3) + "<|endoftext|>" * (i % 2) for i in range(n)]


def expected_tokens(docs: list[str]) -> list[int]:
    return [t for d in docs for t in [*d.encode(), EOT]]


@pytest.fixture
def parquet_files(tmp_path: Path) -> tuple[list[Path], list[str]]:
    """Two parquet shards with extra columns, as in the real dataset; 30 documents in all."""
    docs = make_docs(30)
    paths = [tmp_path / "src" / "000.parquet", tmp_path / "src" / "001.parquet"]
    paths[0].parent.mkdir()
    for path, part in zip(paths, (docs[:17], docs[17:]), strict=True):
        pq.write_table(pa.table({"id": [str(len(d)) for d in part], "text": part}), path)
    return paths, docs


def config(tmp_path: Path, files: list[Path] | str | None, **overrides: Any) -> dict[str, Any]:
    cfg = {
        "name": "fw",
        "source": "fineweb_edu",
        "dir": str(tmp_path / "prepared"),
        "vocab_size": 50257,
        "verify": False,
        "dataset": "HuggingFaceFW/fineweb-edu",
        "subset": "sample-10BT",
        "split": "train",
        "train_docs": 20,
        "val_docs": 6,
        "val_overlaps_train": False,
        "local_files": None
        if files is None
        else files
        if isinstance(files, str)
        else [str(f) for f in files],
        "num_proc": 1,
    }
    return {**cfg, **overrides}


def snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in directory.iterdir()}


def test_disjoint_validation_is_the_next_documents(tmp_path, parquet_files, byte_encoding) -> None:
    paths, docs = parquet_files
    directory = prepare_data(config(tmp_path, paths), encoding=byte_encoding)
    assert directory == tmp_path / "prepared"
    assert sorted(p.name for p in directory.iterdir()) == ["meta.json", "train.bin", "val.bin"]
    train, val = load_split(directory, "train"), load_split(directory, "val")
    assert train.dtype == np.uint16
    assert train.tolist() == expected_tokens(docs[:20])  # crosses the shard boundary at 17
    assert val.tolist() == expected_tokens(docs[20:26])
    # One end-of-text per document, each right after the document's last byte.
    assert int((train == EOT).sum()) == 20 and train[-1] == EOT
    meta = json.loads((directory / "meta.json").read_text())
    assert meta["splits"]["train"]["documents"] == {"start": 0, "stop": 20}
    assert meta["splits"]["val"]["documents"] == {"start": 20, "stop": 26}
    assert meta["splits"]["val"]["tokens"] == len(val)
    assert meta["splits"]["train"]["sha256"] == sha256_file(directory / "train.bin")
    assert meta["tokenizer"] == {"name": "bytes-test", "n_vocab": 257, "eot": EOT}
    assert meta["origin"]["local_files"] == [
        {"name": p.name, "bytes": p.stat().st_size} for p in paths
    ]
    assert meta["params"]["train_docs"] == 20 and meta["params"]["subset"] == "sample-10BT"


def test_overlapping_validation_is_the_first_documents(tmp_path, parquet_files, byte_encoding):
    paths, docs = parquet_files
    cfg = config(tmp_path, paths, val_overlaps_train=True, train_docs=10, val_docs=12)
    directory = prepare_data(cfg, encoding=byte_encoding)
    assert load_split(directory, "train").tolist() == expected_tokens(docs[:10])
    assert load_split(directory, "val").tolist() == expected_tokens(docs[:12])
    meta = json.loads((directory / "meta.json").read_text())
    assert meta["splits"]["val"]["documents"] == {"start": 0, "stop": 12}


def test_globs_jsonl_and_parallel_tokenization_agree(tmp_path, byte_encoding) -> None:
    docs = make_docs(40)
    src = tmp_path / "jsonl"
    src.mkdir()
    # Written out of order: glob expansion sorts, and the sorted order is the stream order.
    for name, part in (("b.jsonl", docs[25:]), ("a.jsonl", docs[:25])):
        (src / name).write_text("".join(json.dumps({"text": d}) + "\n" for d in part))
    serial = prepare_data(
        config(tmp_path, str(src / "*.jsonl"), dir=str(tmp_path / "serial"), train_docs=30),
        encoding=byte_encoding,
    )
    parallel = prepare_data(
        config(
            tmp_path, str(src / "*.jsonl"), dir=str(tmp_path / "par"), train_docs=30, num_proc=2
        ),
        encoding=byte_encoding,
    )
    assert load_split(serial, "train").tolist() == expected_tokens(docs[:30])
    assert load_split(serial, "val").tolist() == expected_tokens(docs[30:36])
    for split in ("train", "val"):
        assert sha256_file(serial / f"{split}.bin") == sha256_file(parallel / f"{split}.bin")


def test_second_prepare_changes_nothing(tmp_path, parquet_files, byte_encoding, monkeypatch):
    paths, _ = parquet_files
    cfg = config(tmp_path, paths)
    directory = prepare_data(cfg, encoding=byte_encoding)
    before = snapshot(directory)

    def no_rebuild(*args: object) -> None:
        raise AssertionError("prepared data was built again")

    monkeypatch.setattr(fineweb_module, "build", no_rebuild)
    assert prepare_data(cfg, encoding=byte_encoding) == directory
    assert prepare_data({**cfg, "verify": True}, encoding=byte_encoding) == directory
    assert snapshot(directory) == before


def test_prepared_data_outlives_its_local_files(tmp_path, parquet_files, byte_encoding) -> None:
    paths, docs = parquet_files
    directory = prepare_data(config(tmp_path, paths), encoding=byte_encoding)
    for path in paths:
        path.unlink()
    for files in (paths, None):  # still configured, or switched back to the hub
        assert prepare_data(config(tmp_path, files), encoding=byte_encoding) == directory
    assert load_split(directory, "val").tolist() == expected_tokens(docs[20:26])


def test_other_settings_never_overwrite_prepared_data(tmp_path, parquet_files, byte_encoding):
    paths, _ = parquet_files
    directory = prepare_data(config(tmp_path, paths), encoding=byte_encoding)
    before = snapshot(directory)
    with pytest.raises(DataError, match=r"prepared with train_docs=20 .* asks for train_docs=15"):
        prepare_data(config(tmp_path, paths, train_docs=15), encoding=byte_encoding)
    with pytest.raises(DataError, match=r"val_overlaps_train=False .*set data.dir"):
        prepare_data(config(tmp_path, paths, val_overlaps_train=True), encoding=byte_encoding)
    with pytest.raises(DataError, match="tokenizer='bytes-test'"):
        prepare_data(config(tmp_path, paths))  # GPT-2 wanted; checked before any tokenizer load
    assert snapshot(directory) == before


def test_directory_without_meta_is_not_overwritten(tmp_path, parquet_files, byte_encoding):
    paths, _ = parquet_files
    target = tmp_path / "prepared"
    target.mkdir()
    (target / "train.bin").write_bytes(b"\x01\x00")
    with pytest.raises(DataError, match="has no meta.json, so it is not prepared data"):
        prepare_data(config(tmp_path, paths), encoding=byte_encoding)
    assert (target / "train.bin").read_bytes() == b"\x01\x00"
    assert sorted(p.name for p in target.iterdir()) == ["train.bin"]


def test_an_empty_directory_is_filled(tmp_path, parquet_files, byte_encoding) -> None:
    paths, docs = parquet_files
    (tmp_path / "prepared").mkdir()
    directory = prepare_data(config(tmp_path, paths), encoding=byte_encoding)
    assert load_split(directory, "train").tolist() == expected_tokens(docs[:20])


def test_a_crash_leaves_nothing_that_looks_prepared(
    tmp_path, parquet_files, byte_encoding, monkeypatch
) -> None:
    paths, _ = parquet_files
    cfg = config(tmp_path, paths)
    real_write = storage_module.write_tokens

    def crash_on_val(path: Path, arrays: Any) -> dict[str, Any]:
        if path.name == "val.bin":
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C after train.bin was written
        return real_write(path, arrays)

    monkeypatch.setattr(fineweb_module, "write_tokens", crash_on_val)
    with pytest.raises(KeyboardInterrupt):
        prepare_data(cfg, encoding=byte_encoding)
    assert list(tmp_path.glob("prepared*")) == []
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    monkeypatch.setattr(fineweb_module, "write_tokens", real_write)
    assert (prepare_data(cfg, encoding=byte_encoding) / "meta.json").is_file()


def test_too_few_documents(tmp_path, parquet_files, byte_encoding) -> None:
    paths, _ = parquet_files
    with pytest.raises(DataError, match=r"ends after 30 documents but 31 are needed"):
        prepare_data(config(tmp_path, paths, train_docs=25), encoding=byte_encoding)
    assert not (tmp_path / "prepared").exists()


def test_local_files_without_text_column(tmp_path, byte_encoding) -> None:
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"content": ["a", "b"]}), path)
    with pytest.raises(DataError, match=r"no string `text` column \(columns: content\)"):
        prepare_data(config(tmp_path, [path], train_docs=1, val_docs=1), encoding=byte_encoding)


def test_bad_local_file_names(tmp_path, byte_encoding) -> None:
    with pytest.raises(DataError, match="matches no file"):
        prepare_data(config(tmp_path, [tmp_path / "none*.parquet"]), encoding=byte_encoding)
    (tmp_path / "x.csv").write_text("text\na\n")
    with pytest.raises(DataError, match="neither .parquet nor .jsonl"):
        prepare_data(config(tmp_path, [tmp_path / "x.csv"]), encoding=byte_encoding)


class HubStub:
    """Stands in for datasets.load_dataset: records hub calls, serves them from local files."""

    def __init__(self, files: list[Path], error: Exception | None = None) -> None:
        self.real = datasets.load_dataset
        self.files = [str(f) for f in files]
        self.error = error
        self.hub_calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def __call__(self, path: str, *args: Any, **kwargs: Any) -> Any:
        if path in ("parquet", "json"):
            return self.real(path, *args, **kwargs)
        self.hub_calls.append(((path, *args), kwargs))
        if self.error is not None:
            raise self.error
        return self.real("parquet", data_files=self.files, split="train", streaming=True)


def test_without_local_files_the_hub_is_streamed(
    tmp_path, parquet_files, byte_encoding, monkeypatch
) -> None:
    paths, docs = parquet_files
    stub = HubStub(paths)
    monkeypatch.setattr(datasets, "load_dataset", stub)
    directory = prepare_data(config(tmp_path, None), encoding=byte_encoding)
    assert stub.hub_calls == [
        (
            ("HuggingFaceFW/fineweb-edu",),
            {"name": "sample-10BT", "split": "train", "streaming": True},
        )
    ]
    assert load_split(directory, "val").tolist() == expected_tokens(docs[20:26])
    meta = json.loads((directory / "meta.json").read_text())
    assert meta["origin"] == {
        "hub": "HuggingFaceFW/fineweb-edu",
        "subset": "sample-10BT",
        "split": "train",
    }


def test_offline_without_local_files_names_both_ways_out(
    tmp_path, byte_encoding, monkeypatch
) -> None:
    error = ConnectionError(
        "Couldn't reach 'HuggingFaceFW/fineweb-edu' on the Hub (LocalEntryNotFoundError)\nmore"
    )
    monkeypatch.setattr(datasets, "load_dataset", HubStub([], error=error))
    with pytest.raises(DataError) as caught:
        prepare_data(config(tmp_path, None), encoding=byte_encoding)
    message = str(caught.value)
    assert "\n" not in message
    assert "Couldn't reach" in message
    assert "connect to the internet" in message
    assert "data.local_files" in message and "`text` column" in message
    assert list(tmp_path.iterdir()) == []


def test_a_stream_that_fails_midway_is_a_data_error(
    tmp_path, parquet_files, byte_encoding, monkeypatch
) -> None:
    paths, _ = parquet_files

    class Flaky:
        def __iter__(self):
            yield {"text": "one"}
            raise OSError("connection reset by peer")

    monkeypatch.setattr(fineweb_module, "open_stream", lambda config: Flaky())
    with pytest.raises(DataError, match=r"reading .* failed: OSError: connection reset by peer"):
        prepare_data(config(tmp_path, paths), encoding=byte_encoding)
    assert list(tmp_path.glob("prepared*")) == [] and not list(tmp_path.glob(".prepared*"))
