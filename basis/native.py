"""The count sketch's compiled CPU kernels (``csrc/count_sketch.c``): S X and both norms in one
pass, and the draw of h and s from a seed (the SplitMix64 streams of ``rng.py``, bit for bit).

At the paper's size a sketched call is dominated by per-op overhead, not arithmetic: in PyTorch ops
S X (a scatter and a GEMM, or a CSR product) and the two norms of the invariant scalar are five to
seven ops, 35-53 µs for 64 rows of 64-256 features, where this kernel takes 4-7 µs; at the
64 × 50,257 head it reads dY once instead of three times (0.49 vs 0.89 ms; warm loops, 2 threads).
``BASIS_NATIVE=0 python scripts/bench_basis.py`` times the layers without it, for comparison.
The C file is compiled at first use with the system C compiler into the user cache
(``data.cache.cache_dir()``) and loaded with ctypes, so there is no build step, no PyTorch headers
and nothing to install; its threads come from the OpenMP runtime PyTorch has already loaded.
Without a compiler, or with ``BASIS_NATIVE=0``, or if its first-use self-check against PyTorch
fails, everything runs through PyTorch ops as before (one warning says why). Sketches agree with
the PyTorch route to fp32 rounding, not bit for bit; drawn h and s are identical.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sysconfig
import warnings
from pathlib import Path

import torch

from .rng import SIGN_SALT, count_sketch_hashes

_SOURCE = Path(__file__).with_name("csrc") / "count_sketch.c"
# Tried in order: OpenMP and this CPU's vector units, then without each.
_FLAG_SETS = (
    ["-O3", "-march=native", "-fopenmp"],
    ["-O3", "-fopenmp"],
    ["-O3"],
)
_state: dict[str, object] = {"lib": None, "tried": False}


def available() -> bool:
    """Whether the compiled kernels are enabled here, built and self-checked (done once)."""
    return _kernel() is not None


def _kernel() -> ctypes.CDLL | None:
    if os.environ.get("BASIS_NATIVE", "1") == "0":
        return None
    if not _state["tried"]:
        _state["tried"] = True
        _state["lib"] = _load()
    return _state["lib"]


def count_sketch(
    rows: torch.Tensor, h: torch.Tensor, s: torch.Tensor, rank: int
) -> tuple[torch.Tensor, float, float] | None:
    """``(S rows, ‖rows‖²_F, ‖S rows‖²_F)`` for S[h[i], i] = s[i], or None where the kernel does
    not apply: it takes fp32 CPU rows with unit column stride, contiguous int64 h and fp32 s."""
    # Plain attribute checks: this runs for every sketched product, where a few µs matter.
    if (
        rows.device.type != "cpu"
        or rows.dtype != torch.float32
        or rows.dim() != 2
        or (rows.stride(1) != 1 and rows.shape[1] > 1)
        or h.dtype != torch.int64
        or s.dtype != torch.float32
        or h.device.type != "cpu"
        or s.device.type != "cpu"
        or not (h.is_contiguous() and s.is_contiguous())
        or torch.compiler.is_compiling()
    ):
        return None
    lib = _kernel()
    if lib is None:
        return None
    n, k = rows.shape
    if h.numel() != n or s.numel() != n:
        raise ValueError(
            f"h and s must have one entry per row ({n}), got {h.numel()} and {s.numel()}"
        )
    out = torch.empty(rank, k, dtype=torch.float32)
    sq = (ctypes.c_double * 2)()
    status = lib.basis_count_sketch_f32(
        rows.data_ptr(),
        n,
        k,
        rows.stride(0),  # 0 for rows broadcast from one (an expanded gradient)
        h.data_ptr(),
        s.data_ptr(),
        rank,
        out.data_ptr(),
        sq,
        torch.get_num_threads(),
    )
    if status == -1:
        raise ValueError(f"h must hold bin ids in [0, {rank})")
    if status != 0:
        raise MemoryError("count sketch: out of memory for per-block sums")
    return out, sq[0], sq[1]


def draw_count_sketch(
    rows: int, rank: int, balanced: bool, seed: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(h, s)`` on CPU, equal to ``rng.count_sketch_hashes``; None without the kernel."""
    lib = _kernel()
    if lib is None or torch.compiler.is_compiling():
        return None
    h = torch.empty(rows, dtype=torch.int64)
    s = torch.empty(rows, dtype=torch.float32)
    status = lib.basis_draw_count_sketch(
        seed, seed ^ SIGN_SALT, rows, rank, int(balanced), h.data_ptr(), s.data_ptr()
    )
    if status == -1:
        raise ValueError(f"a count sketch needs rows >= 0 and rank >= 1, got {rows} and {rank}")
    if status != 0:
        raise MemoryError("count sketch: out of memory for the draw")
    return h, s


def _compiler() -> str | None:
    names = [os.environ.get("CC"), (sysconfig.get_config_var("CC") or "").split(" ")[0], "cc"]
    return next((path for n in names if n and (path := shutil.which(n))), None)


def _load():
    compiler = _compiler()
    if compiler is None:
        return _give_up("no C compiler found (set CC)")
    from data.cache import cache_dir  # $BASIS_CACHE_DIR, else ~/.cache/basis (lazy: light import)

    source = _SOURCE.read_bytes()
    cpu = _cpu_signature()
    for flags in _FLAG_SETS:
        key = hashlib.sha256(b"\0".join([source, compiler.encode(), " ".join(flags).encode(), cpu]))
        lib = cache_dir() / f"count_sketch-{key.hexdigest()[:16]}.so"
        if not lib.exists() and not _compile(compiler, flags, lib):
            continue
        try:
            dll = ctypes.CDLL(str(lib))
            sketch, draw = dll.basis_count_sketch_f32, dll.basis_draw_count_sketch
        except (OSError, AttributeError):
            continue
        sketch.restype = draw.restype = ctypes.c_int
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        sketch.argtypes = [ptr, i64, i64, i64, ptr, ptr, i64, ptr]
        sketch.argtypes += [ctypes.POINTER(ctypes.c_double), ctypes.c_int]
        draw.argtypes = [ctypes.c_uint64, ctypes.c_uint64, i64, i64, ctypes.c_int, ptr, ptr]
        if _self_check(dll):
            return dll
    return _give_up(f"{compiler} could not build a kernel that passes its self-check")


def _compile(compiler: str, flags: list[str], lib: Path) -> bool:
    """Build through a temporary file renamed into place: parallel jobs never see half a file."""
    from data.cache import atomic_output  # the project's one way to write a file atomically

    try:
        with atomic_output(lib) as tmp:
            cmd = [compiler, *flags, "-shared", "-fPIC", "-o", str(tmp), str(_SOURCE)]
            if subprocess.run(cmd, capture_output=True, timeout=120).returncode != 0:
                raise OSError(f"{compiler} failed")
        return True
    except (OSError, subprocess.SubprocessError):
        return False


def _self_check(dll: ctypes.CDLL) -> bool:
    for seed, balanced in ((2**64 - 1, True), (12345, False)):
        h, s = torch.empty(37, dtype=torch.int64), torch.empty(37)
        args = (seed, seed ^ SIGN_SALT, 37, 5, balanced, h.data_ptr(), s.data_ptr())
        if dll.basis_draw_count_sketch(*args) != 0:
            return False
        want_h, want_s = count_sketch_hashes(37, 5, balanced, seed)
        if not (torch.equal(h, want_h) and torch.equal(s, want_s)):
            return False
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(37, 1100, generator=gen)
    h = torch.randint(0, 5, (37,), generator=gen)
    s = torch.randint(0, 2, (37,), generator=gen).float() * 2 - 1
    out = torch.empty(5, 1100)
    sq = (ctypes.c_double * 2)()
    args = (rows.data_ptr(), 37, 1100, 1100, h.data_ptr(), s.data_ptr(), 5)
    if dll.basis_count_sketch_f32(*args, out.data_ptr(), sq, 2) != 0:
        return False
    expect = torch.zeros(5, 1100, dtype=torch.float64).index_add_(0, h, rows.double() * s[:, None])
    sq_rows, sq_out = sq[0], sq[1]
    return (
        torch.allclose(out.double(), expect, rtol=1e-5, atol=1e-5)
        and abs(sq_rows / rows.double().square().sum().item() - 1) < 1e-6
        and abs(sq_out / expect.square().sum().item() - 1) < 1e-6
    )


def _cpu_signature() -> bytes:
    """-march=native code must not be reused on another CPU sharing the cache (e.g. over NFS)."""
    try:
        with open("/proc/cpuinfo", "rb") as f:
            lines = [ln for ln in f.read().splitlines() if ln.startswith((b"flags", b"model name"))]
        return b"\n".join(sorted(set(lines)))
    except OSError:
        return platform.processor().encode() + platform.machine().encode()


def _give_up(why: str) -> None:
    warnings.warn(
        f"BASIS: compiled count sketch unavailable ({why}); using PyTorch ops", stacklevel=3
    )
    return None
