"""The GPT-2 BPE tokenizer, without depending on tiktoken's own download.

tiktoken.get_encoding("gpt2") fetches two files from openaipublic.blob.core.windows.net with
`requests.get` and no timeout, so where that host is unreachable but resolvable it can hang.
We therefore call it only when tiktoken's cache already holds both files with the right hashes.
Otherwise we build the identical encoding from the 50,256 BPE ranks that ship in the
openai-whisper sdist on PyPI (spec section 4): same ranks, tiktoken's own gpt2 pattern, and
<|endoftext|> = 50256.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import os
import tempfile
from pathlib import Path

import tiktoken

from data.cache import cache_dir, sha256_file
from data.errors import DataError
from data.pypi import PinnedSdist, extract_member

GPT2_VOCAB_SIZE = 50257
GPT2_EOT = 50256
ENDOFTEXT = "<|endoftext|>"

WHISPER_SDIST = PinnedSdist(
    project="openai-whisper",
    version="20250625",
    filename="openai_whisper-20250625.tar.gz",
    sha256="37a91a3921809d9f44748ffc73c0a55c9f366c85a3ef5c2ae0cc09540432eb96",
)
WHISPER_RANKS_MEMBER = "openai_whisper-20250625/whisper/assets/gpt2.tiktoken"
GPT2_RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"

# tiktoken's gpt2 pattern, copied so the fallback still works if tiktoken_ext moves it; the tests
# check that it equals tiktoken's.
GPT2_PATTERN = (
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
)

# The files tiktoken's gpt2 constructor reads (tiktoken 0.7 to 0.14), with their sha256.
_TIKTOKEN_GPT2_FILES = {
    "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe":
        "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json":
        "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}  # fmt: skip


def gpt2_ranks_path() -> Path:
    return cache_dir() / "gpt2.tiktoken"


def tiktoken_cache_has_gpt2() -> bool:
    """True when tiktoken.get_encoding("gpt2") can be served from its cache without a request."""
    if "TIKTOKEN_CACHE_DIR" in os.environ:
        directory = os.environ["TIKTOKEN_CACHE_DIR"]
    elif "DATA_GYM_CACHE_DIR" in os.environ:
        directory = os.environ["DATA_GYM_CACHE_DIR"]
    else:
        directory = os.path.join(tempfile.gettempdir(), "data-gym-cache")
    if not directory:  # tiktoken treats "" as "never cache", i.e. always download
        return False
    for url, expected in _TIKTOKEN_GPT2_FILES.items():
        path = Path(directory) / hashlib.sha1(url.encode()).hexdigest()
        # A mismatching cached file makes tiktoken delete it and download again.
        if not path.is_file() or sha256_file(path) != expected:
            return False
    return True


def _pattern() -> str:
    try:
        from tiktoken_ext.openai_public import r50k_pat_str
    except ImportError:
        return GPT2_PATTERN
    return r50k_pat_str


def read_ranks(path: Path) -> dict[bytes, int]:
    """Parse a tiktoken rank file (base64 token, space, rank per line) after checking its hash.

    Not tiktoken.load.load_tiktoken_bpe: that copies any local file into tiktoken's cache.
    """
    raw = path.read_bytes()
    if hashlib.sha256(raw).hexdigest() != GPT2_RANKS_SHA256:
        raise DataError(
            f"{path} is not the GPT-2 rank file (sha256 differs); delete it and run again"
        )
    ranks: dict[bytes, int] = {}
    for line in raw.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def encoding_from_ranks(path: Path) -> tiktoken.Encoding:
    """The GPT-2 encoding built from the verified rank file at `path`."""
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=_pattern(),
        mergeable_ranks=read_ranks(path),
        special_tokens={ENDOFTEXT: GPT2_EOT},
        explicit_n_vocab=GPT2_VOCAB_SIZE,
    )


def _check(encoding: tiktoken.Encoding, source: str) -> tiktoken.Encoding:
    if (
        encoding.n_vocab != GPT2_VOCAB_SIZE
        or encoding.eot_token != GPT2_EOT
        or encoding.encode_ordinary("Hello world") != [15496, 995]
    ):
        raise DataError(
            f"the GPT-2 encoding from {source} is wrong (vocab {encoding.n_vocab}, eot "
            f"{encoding.eot_token}); delete that cache and run again"
        )
    return encoding


@functools.cache
def get_gpt2_encoding() -> tiktoken.Encoding:
    """GPT-2 BPE as a tiktoken Encoding: vocab 50,257, <|endoftext|> = 50256.

    Order: tiktoken's own "gpt2" when its cache holds it; else our cached rank file; else the
    rank file fetched once from the openai-whisper sdist on PyPI (sha256-verified); else a
    DataError saying what to do.
    """
    if tiktoken_cache_has_gpt2():
        return _check(tiktoken.get_encoding("gpt2"), "tiktoken's cache")
    try:
        path = extract_member(
            WHISPER_SDIST, WHISPER_RANKS_MEMBER, GPT2_RANKS_SHA256, gpt2_ranks_path()
        )
    except DataError as e:
        raise DataError(f"GPT-2 tokenizer unavailable: {e}") from e
    return _check(encoding_from_ranks(path), str(path))
