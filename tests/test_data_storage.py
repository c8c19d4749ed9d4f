"""Prepared-data integrity: every damage load_split can see is a one-line DataError.
Also the atomic writers and the `data` config node."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from data import DataError, load_split, prepare_data
from data.cache import atomic_output, atomic_write_bytes, cache_dir, sha256_file
from data.config import DataConfig
from data.prepare import main as prepare_main
from data.storage import TargetAppeared, staging_directory, write_meta, write_tokens

REPO = Path(__file__).resolve().parent.parent
TRAIN = np.array([5, 6, 7, 50256, 8, 9, 50256], dtype=np.uint16)
VAL = np.array([1, 2, 50256], dtype=np.uint16)


def make_prepared(target: Path, n_vocab: int = 50257) -> Path:
    with staging_directory(target) as staging:
        splits = {
            "train": write_tokens(staging / "train.bin", [TRAIN[:3], TRAIN[3:]]),
            "val": write_tokens(staging / "val.bin", [VAL]),
        }
        write_meta(
            staging,
            {
                "params": {"source": "test"},
                "tokenizer": {"name": "gpt2", "n_vocab": n_vocab, "eot": 50256},
                "splits": splits,
            },
        )
    return target


@pytest.fixture
def prepared(tmp_path: Path) -> Path:
    return make_prepared(tmp_path / "prepared")


def assert_one_line_error(call, pattern: str) -> str:
    with pytest.raises(DataError, match=pattern) as caught:
        call()
    assert "\n" not in str(caught.value)
    return str(caught.value)


def test_a_valid_split_loads_as_a_read_only_uint16_memmap(prepared: Path) -> None:
    train = load_split(prepared, "train", verify=True)
    assert isinstance(train, np.memmap) and train.dtype == np.uint16
    assert train.tolist() == TRAIN.tolist()
    assert load_split(str(prepared), "val").tolist() == VAL.tolist()
    with pytest.raises(ValueError):
        train[0] = 1
    meta = json.loads((prepared / "meta.json").read_text())
    assert meta["splits"]["train"] == {
        "file": "train.bin",
        "tokens": 7,
        "sha256": sha256_file(prepared / "train.bin"),
        "max_token": 50256,
    }


def test_missing_directory_and_meta(tmp_path: Path, prepared: Path) -> None:
    assert_one_line_error(
        lambda: load_split(tmp_path / "nowhere", "train"), "no prepared data at .*data.prepare"
    )
    (prepared / "meta.json").unlink()
    assert_one_line_error(lambda: load_split(prepared, "train"), "has no meta.json")


def test_garbled_or_foreign_meta(prepared: Path) -> None:
    (prepared / "meta.json").write_text("{not json")
    assert_one_line_error(lambda: load_split(prepared, "train"), "unreadable")
    (prepared / "meta.json").write_text(json.dumps({"format": "nanogpt"}))
    assert_one_line_error(lambda: load_split(prepared, "train"), "not in format basis-tokens/1")


def test_unknown_split(prepared: Path) -> None:
    assert_one_line_error(
        lambda: load_split(prepared, "test"), "no split 'test'; it has train, val"
    )


def test_missing_token_file(prepared: Path) -> None:
    (prepared / "val.bin").unlink()
    assert_one_line_error(lambda: load_split(prepared, "val"), r"val.bin is missing; delete")


def test_size_not_a_multiple_of_two(prepared: Path) -> None:
    with open(prepared / "train.bin", "ab") as f:
        f.write(b"\x00")
    assert_one_line_error(lambda: load_split(prepared, "train"), "15 bytes, not a whole number")


def test_token_count_differs_from_meta(prepared: Path) -> None:
    with open(prepared / "train.bin", "ab") as f:
        f.write(b"\x00\x00")
    assert_one_line_error(
        lambda: load_split(prepared, "train"), "holds 8 tokens but meta.json says 7"
    )


def test_sha256_mismatch_is_found_by_verify(prepared: Path) -> None:
    data = bytearray((prepared / "train.bin").read_bytes())
    data[0] ^= 1  # token 5 -> 4: same size, still a valid id
    (prepared / "train.bin").write_bytes(bytes(data))
    assert load_split(prepared, "train")[0] == 4  # the cheap checks cannot see it
    assert_one_line_error(lambda: load_split(prepared, "train", verify=True), "sha256")


def test_token_id_beyond_the_vocabulary(prepared: Path) -> None:
    data = bytearray((prepared / "train.bin").read_bytes())
    data[2:4] = np.array([60000], dtype="<u2").tobytes()
    (prepared / "train.bin").write_bytes(bytes(data))
    assert_one_line_error(lambda: load_split(prepared, "train"), "token id 60000 >= vocabulary")


def test_data_tokenized_for_a_larger_vocabulary(tmp_path: Path) -> None:
    prepared = make_prepared(tmp_path / "big", n_vocab=100277)
    assert_one_line_error(lambda: load_split(prepared, "train"), "vocabulary size is 50257")
    assert load_split(prepared, "train", vocab_size=100277).size == 7


def test_empty_split(tmp_path: Path) -> None:
    with staging_directory(tmp_path / "p") as staging:
        splits = {"train": write_tokens(staging / "train.bin", [])}
        write_meta(staging, {"tokenizer": {"n_vocab": 50257}, "splits": splits})
    assert_one_line_error(lambda: load_split(tmp_path / "p", "train"), "is empty")


def test_token_ids_must_fit_uint16(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="70000 does not fit in uint16"):
        write_tokens(tmp_path / "x.bin", [np.array([1, 70000])])
    assert list(tmp_path.iterdir()) == []  # the temporary file went too


def test_prepare_refuses_damaged_prepared_data(prepared: Path) -> None:
    meta = json.loads((prepared / "meta.json").read_text())
    cfg = {"name": "x", "source": "shakespeare", "dir": str(prepared)}
    # Make the identity match a Shakespeare preparation so only the damage is left to find.
    from data import shakespeare

    meta["params"] = shakespeare.params(DataConfig.from_node(cfg), "gpt2")
    (prepared / "meta.json").write_text(json.dumps(meta))
    before = (prepared / "train.bin").read_bytes()
    with open(prepared / "train.bin", "ab") as f:
        f.write(b"\x00\x00")
    assert_one_line_error(lambda: prepare_data(cfg), "holds 8 tokens but meta.json says 7")
    assert (prepared / "train.bin").read_bytes() == before + b"\x00\x00"


def test_atomic_output_keeps_the_old_file_when_writing_fails(tmp_path: Path) -> None:
    target = tmp_path / "f.bin"
    atomic_write_bytes(target, b"old")
    with pytest.raises(RuntimeError), atomic_output(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("crash")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new"
    assert oct(target.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def test_staging_never_replaces_a_directory_that_appeared(tmp_path: Path) -> None:
    target = tmp_path / "t"
    with pytest.raises(TargetAppeared), staging_directory(target) as staging:
        (staging / "mine").write_text("x")
        target.mkdir()
        (target / "theirs").write_text("y")
    assert [p.name for p in target.iterdir()] == ["theirs"]
    assert [p.name for p in tmp_path.iterdir()] == ["t"]


def test_cache_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("BASIS_CACHE_DIR", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert cache_dir() == tmp_path / "a"
    monkeypatch.delenv("BASIS_CACHE_DIR")
    assert cache_dir() == tmp_path / "x" / "basis"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "basis"


@pytest.mark.parametrize("name", ["shakespeare", "fineweb_edu"])
def test_config_files_resolve(name: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    node = OmegaConf.load(REPO / "configs" / "data" / f"{name}.yaml")
    monkeypatch.delenv("BASIS_DATA_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    config = DataConfig.from_node(node)
    assert (config.name, config.source, config.vocab_size) == (name, name, 50257)
    assert config.dir == tmp_path / ".data" / name  # relative to the working directory
    monkeypatch.setenv("BASIS_DATA_DIR", "/srv/tokens")
    assert DataConfig.from_node(dict(node)).dir == Path("/srv/tokens") / name
    if name == "fineweb_edu":
        assert (config.dataset, config.subset, config.split) == (
            "HuggingFaceFW/fineweb-edu",
            "sample-10BT",
            "train",
        )
        assert (config.train_docs, config.val_docs, config.val_overlaps_train) == (
            50000,
            500,
            False,
        )
        assert config.local_files is None and config.num_proc is None


@pytest.mark.parametrize(
    "change, message",
    [
        ({"source": "wikitext"}, "data.source='wikitext' is unknown"),
        ({"dir": None}, "lacks `dir`"),
        ({"train_docs": 0}, "train_docs must be a positive integer"),
        ({"val_docs": "many"}, "val_docs must be a positive integer"),
        ({"vocab_size": 50000}, "cannot hold GPT-2 tokens"),
        ({"num_proc": 0}, "num_proc must be null or a positive integer"),
        ({"val_overlaps_train": "yes"}, "must be true or false"),
    ],
)
def test_bad_config_values(change: dict[str, object], message: str) -> None:
    cfg = {"name": "fw", "source": "fineweb_edu", "dir": "/tmp/x", **change}
    with pytest.raises(DataError, match=message):
        DataConfig.from_node(cfg)


def test_cli_reports_bad_arguments_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert prepare_main(["data=wikitext"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: bad arguments 'data=wikitext'") and err.count("\n") == 1
    assert "fineweb_edu" in err and "shakespeare" in err


def test_cli_prepares_and_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # An already prepared directory: the CLI checks it and prints the token counts.
    from data import shakespeare

    target = tmp_path / "sh"
    make_prepared(target)
    meta = json.loads((target / "meta.json").read_text())
    cfg = {"name": "shakespeare", "source": "shakespeare", "dir": str(target)}
    meta["params"] = shakespeare.params(DataConfig.from_node(cfg), "gpt2")
    (target / "meta.json").write_text(json.dumps(meta))
    assert prepare_main(["data=shakespeare", f"data.dir={target}"]) == 0
    assert capsys.readouterr().out.strip() == f"{target}: train 7 tokens, val 3 tokens"
