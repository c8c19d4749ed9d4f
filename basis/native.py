"""BASIS's compiled CPU code: the count-sketch kernel (``csrc/count_sketch.c``) and the sketched
linear layer as a PyTorch operator (``csrc/sketched_linear.cpp``).

The kernel does S X and both norms of the invariant scalar in one pass, and draws h and s from a
seed (the SplitMix64 streams of ``rng.py``, bit for bit). At the paper's size a sketched call is
dominated by per-op overhead, not arithmetic: in PyTorch ops S X (a scatter and a GEMM, or a CSR
product) and the two norms are five to seven ops, 35-53 µs for 64 rows of 64-256 features, where
this kernel takes 4-7 µs; at the 64 × 50,257 head it reads dY once instead of three times (0.49
vs 0.89 ms; warm loops, 2 threads). It is compiled with the system C compiler and loaded with
ctypes: no PyTorch headers; its threads come from the OpenMP runtime PyTorch has already loaded.

The operator ``torch.ops.basis.sketched_linear`` is ``basis_linear``'s fp32 CPU path with a C++
autograd node around the same kernel (which it includes) and the same GEMMs, so its results are
the Python path's, bit for bit; it spares the Python ``autograd.Function`` that cost more than the
layer's arithmetic inside a training step. It is compiled against the installed PyTorch's headers
(shipped in its wheel) with the system C++ compiler, ~15 s once.

Both are built at first use into the user cache (``data.cache.cache_dir()``), keyed by their
source, compiler, flags and CPU (and PyTorch's version for the operator), and self-checked against
PyTorch ops before first use. Without a compiler, or with ``BASIS_NATIVE=0``, or if a build or a
self-check fails, everything runs through PyTorch ops as before (one warning says why).
``BASIS_NATIVE=0 python scripts/bench_basis.py`` times the layers without them, for comparison.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import platform
import shutil
import subprocess
import sysconfig
import warnings
from pathlib import Path

import torch

from .rng import SIGN_SALT, as_int64, count_sketch_hashes

_SOURCE = Path(__file__).with_name("csrc") / "count_sketch.c"
_OP_SOURCE = _SOURCE.with_name("sketched_linear.cpp")  # includes _SOURCE
# Tried in order: OpenMP and this CPU's vector units, then without each.
_FLAG_SETS = (
    ["-O3", "-march=native", "-fopenmp"],
    ["-O3", "-fopenmp"],
    ["-O3"],
)
_state: dict[str, object] = {"lib": None, "tried": False}
_op_state: dict[str, object] = {"op": None, "tried": False}
_SIGN_SALT_INT64 = as_int64(SIGN_SALT)  # the operator draws signs from seed ^ SIGN_SALT


def available() -> bool:
    """Whether the compiled kernels are enabled here, built and self-checked (done once)."""
    return _kernel() is not None


def _kernel() -> ctypes.CDLL | None:
    """The kernel, loaded at first use (``BASIS_NATIVE`` is read then, not at every call)."""
    if not _state["tried"]:
        _state["tried"] = True
        _state["lib"] = None if os.environ.get("BASIS_NATIVE", "1") == "0" else _load()
    return _state["lib"]


def _takes(rows: torch.Tensor) -> bool:
    """Whether the kernel can read ``rows``: fp32 on CPU, 2-D, unit column stride."""
    # Plain attribute checks: this runs for every sketched product, where a few µs matter.
    return (
        rows.device.type == "cpu"
        and rows.dtype == torch.float32
        and rows.dim() == 2
        and (rows.stride(1) == 1 or rows.shape[1] <= 1)
        and not torch.compiler.is_compiling()
    )


def count_sketch(
    rows: torch.Tensor, h: torch.Tensor, s: torch.Tensor, rank: int
) -> tuple[torch.Tensor, float, float] | None:
    """``(S rows, ‖rows‖²_F, ‖S rows‖²_F)`` for S[h[i], i] = s[i], or None where the kernel does
    not apply: it takes fp32 CPU rows with unit column stride, contiguous int64 h and fp32 s."""
    if not (
        _takes(rows)
        and h.dtype == torch.int64
        and s.dtype == torch.float32
        and h.device.type == "cpu"
        and s.device.type == "cpu"
        and h.is_contiguous()
        and s.is_contiguous()
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
        None,  # no column sums
        torch.get_num_threads(),
    )
    if status == -1:
        raise ValueError(f"h must hold bin ids in [0, {rank})")
    if status != 0:
        raise MemoryError("count sketch: out of memory for per-block sums")
    return out, sq[0], sq[1]


def seeded_count_sketch(
    rows: torch.Tensor,
    rank: int,
    balanced: bool,
    seed: int,
    *,
    colsum: bool = False,
    mult: float = 0.0,
    invariant: bool = False,
    eps: float = 1e-8,
) -> tuple[torch.Tensor, float, float, torch.Tensor | None] | None:
    """``count_sketch`` of the (h, s) that ``draw_count_sketch(len(rows), rank, balanced, seed)``
    draws, in one call; None where the kernel does not apply. Returns ``(S rows, ‖rows‖²,
    ‖S rows‖², column sums of rows or None)``. With ``mult`` ≠ 0 the sketch comes back multiplied
    by ``mult`` and, if ``invariant``, by γ = ‖rows‖ / (‖S rows‖ + eps): a second pass over it,
    for small sketches, that spares a tensor op (each costs several µs at the paper's size)."""
    if not _takes(rows):
        return None
    lib = _kernel()
    if lib is None:
        return None
    n, k = rows.shape
    out = torch.empty(rank, k, dtype=torch.float32)
    sums = torch.empty(k, dtype=torch.float32) if colsum else None
    sq = (ctypes.c_double * 2)()
    status = lib.basis_count_sketch_seeded_f32(
        rows.data_ptr(),
        n,
        k,
        rows.stride(0),
        seed,
        seed ^ SIGN_SALT,
        rank,
        balanced,
        out.data_ptr(),
        sq,
        None if sums is None else sums.data_ptr(),
        mult,
        invariant,
        eps,
        torch.get_num_threads(),
    )
    if status == -1:
        raise ValueError(f"a count sketch needs rows >= 0 and rank >= 1, got {n} and {rank}")
    if status != 0:
        raise MemoryError("count sketch: out of memory")
    return out, sq[0], sq[1], sums


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


def sketched_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    rank: int,
    lam: float,
    scale: float,
    eps: float,
    invariant_scalars: bool,
    balanced: bool,
    seed: int,
    scale_in_sketch_max: int,
    onednn_forward: bool,
    onednn_input_grad: bool,
) -> torch.Tensor | None:
    """``basis_linear`` of fp32 CPU tensors with a count sketch drawn from ``seed`` (in [0, 2⁶⁴)),
    by the compiled operator; None where it does not apply or is unavailable (the caller's Python
    path then runs). ``onednn_*``: run y = x Wᵀ, dX = dY W in oneDNN (``gemm.use_onednn``), else in
    PyTorch's defaults (``F.linear``, ``matmul``); dW's product is PyTorch's ``mm`` either way."""
    op = _op_state["op"] if _op_state["tried"] else _operator()
    # Attribute tests only: inside a training step, with the caches just flushed by the output
    # head's products, each line of Python here costs microseconds.
    if (
        op is None
        or x.dtype != torch.float32
        or weight.dtype != torch.float32
        or x.device.type != "cpu"
        or (bias is not None and bias.dtype != torch.float32)
        or torch.is_autocast_enabled("cpu")
        or torch.compiler.is_compiling()
    ):
        return None
    return op(
        x, weight, bias, rank, lam, scale, eps, invariant_scalars, balanced, as_int64(seed),
        _SIGN_SALT_INT64, scale_in_sketch_max, onednn_forward, onednn_input_grad,
    )  # fmt: skip


def prepare() -> bool:
    """Build (or load) the compiled kernel and operator now rather than at their first use, which
    may be inside something being timed (the operator's first build takes ~15 s). Returns whether
    the operator is available."""
    available()
    return operator_available()


def operator_available() -> bool:
    """Whether ``torch.ops.basis.sketched_linear`` is enabled here, built and self-checked."""
    return _operator() is not None


def _operator():
    """The operator, loaded at first use (``BASIS_NATIVE`` is read then, not at every call)."""
    if not _op_state["tried"]:
        _op_state["tried"] = True
        _op_state["op"] = None if os.environ.get("BASIS_NATIVE", "1") == "0" else _load_operator()
    return _op_state["op"]


def _compiler(cpp: bool = False) -> str | None:
    env, default = ("CXX", "c++") if cpp else ("CC", "cc")
    names = [os.environ.get(env), (sysconfig.get_config_var(env) or "").split(" ")[0], default]
    return next((path for n in names if n and (path := shutil.which(n))), None)


def _built(stem: str, key: list[bytes], command: list[str]) -> Path | None:
    """The library ``command`` (a compiler call without ``-o``) builds, from the cache or compiled
    into it now; None if the compiler fails. The cache name hashes ``key`` (what the library's
    content depends on: sources, compiler, flags, versions), not paths, so clones of the repo and
    fresh virtual environments share one build."""
    from data.cache import cache_dir  # $BASIS_CACHE_DIR, else ~/.cache/basis (lazy: light import)

    digest = hashlib.sha256(b"\0".join([*key, cpu_signature()]))
    lib = cache_dir() / f"{stem}-{digest.hexdigest()[:16]}.so"
    if lib.exists() or _compile(command, lib):
        return lib
    return None


def _load():
    compiler = _compiler()
    if compiler is None:
        return _give_up("no C compiler found (set CC)")
    for flags in _FLAG_SETS:
        cmd = [compiler, *flags, "-shared", "-fPIC", str(_SOURCE), "-lm"]
        key = [_SOURCE.read_bytes(), compiler.encode(), " ".join(flags).encode()]
        lib = _built("count_sketch", key, cmd)
        if lib is None:
            continue
        try:
            dll = ctypes.CDLL(str(lib))
            sketch, draw = dll.basis_count_sketch_f32, dll.basis_draw_count_sketch
            seeded = dll.basis_count_sketch_seeded_f32
        except (OSError, AttributeError):
            continue
        sketch.restype = draw.restype = seeded.restype = ctypes.c_int
        i64, u64, ptr, c_int = ctypes.c_int64, ctypes.c_uint64, ctypes.c_void_p, ctypes.c_int
        c_bool = ctypes.c_int
        sq = ctypes.POINTER(ctypes.c_double)
        sketch.argtypes = [ptr, i64, i64, i64, ptr, ptr, i64, ptr, sq, ptr, c_int]
        draw.argtypes = [u64, u64, i64, i64, c_int, ptr, ptr]
        seeded.argtypes = [ptr, i64, i64, i64, u64, u64, i64, c_bool, ptr, sq, ptr]
        seeded.argtypes += [ctypes.c_double, c_bool, ctypes.c_double, c_int]
        if _self_check(dll):
            return dll
    return _give_up(f"{compiler} could not build a kernel that passes its self-check")


def _registered_operator():
    """The operator if a library in this process registered it already (the ``basis`` namespace
    can be registered only once per process, so it is never loaded twice)."""
    try:
        return torch.ops.basis.sketched_linear
    except (AttributeError, RuntimeError):
        return None


def _load_operator():
    registered = _registered_operator()
    if registered is not None:
        return registered
    compiler = _compiler(cpp=True)
    if compiler is None:
        return _give_up("no C++ compiler found (set CXX)", "compiled operator")
    root = Path(torch.__file__).parent
    include, libdir = root / "include", root / "lib"
    if not (include / "torch" / "library.h").is_file():
        return _give_up(f"this PyTorch has no C++ headers ({include})", "compiled operator")
    common = [
        "-std=c++20", "-shared", "-fPIC",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}",
        f"-I{include}", f"-I{include / 'torch' / 'csrc' / 'api' / 'include'}",
        str(_OP_SOURCE),
        f"-L{libdir}", f"-Wl,-rpath,{libdir}", "-ltorch", "-ltorch_cpu", "-lc10", "-lm",
    ]  # fmt: skip
    sources = [_OP_SOURCE.read_bytes(), _SOURCE.read_bytes(), compiler.encode()]
    abi = f"{torch.__version__} abi{int(torch.compiled_with_cxx11_abi())}".encode()
    for flags in _FLAG_SETS:
        key = [*sources, abi, " ".join(flags).encode()]
        lib = _built("sketched_linear", key, [compiler, *flags, *common])
        if lib is None:
            continue
        # One load only: a second library registering the `basis` namespace would be refused.
        try:
            torch.ops.load_library(str(lib))
            op = torch.ops.basis.sketched_linear
        except (OSError, RuntimeError, AttributeError) as e:
            return _give_up(f"{lib.name} did not load: {e}", "compiled operator")
        if _operator_self_check(op):
            return op
        return _give_up(f"{lib.name} failed its self-check", "compiled operator")
    return _give_up(f"{compiler} could not build {_OP_SOURCE.name}", "compiled operator")


def _compile(command: list[str], lib: Path) -> bool:
    """Build through a temporary file renamed into place: parallel jobs never see half a file."""
    from data.cache import atomic_output  # the project's one way to write a file atomically

    try:
        with atomic_output(lib) as tmp:
            cmd = [*command, "-o", str(tmp)]
            if subprocess.run(cmd, capture_output=True, timeout=600).returncode != 0:
                raise OSError(f"{command[0]} failed")
        return True
    except (OSError, subprocess.SubprocessError):
        return False


def _operator_self_check(op) -> bool:
    """The operator against Algorithm 1 written out in PyTorch ops, on one small layer."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 19, 24, generator=gen, requires_grad=True)
    w = torch.randn(40, 24, generator=gen, requires_grad=True)
    b = torch.randn(40, generator=gen, requires_grad=True)
    dy = torch.randn(2, 19, 40, generator=gen)
    rank, lam, eps, seed = 5, 0.1, 1e-8, 2**64 - 3
    from .gemm import onednn_available  # lazy: gemm imports nothing from here, but keep it light

    grads = []
    for onednn in (False, True) if onednn_available() else (False,):
        x.grad = w.grad = b.grad = None
        try:
            args = (rank, lam, 2.0, eps, True, True, as_int64(seed), _SIGN_SALT_INT64, 0)
            args += (onednn, onednn)
            y = op(x, w, b, *args)
            y.backward(dy)
        except RuntimeError:
            return False
        grads.append((y.detach(), x.grad, w.grad, b.grad))
    h, s = count_sketch_hashes(38, rank, True, seed)
    sketch = torch.zeros(rank, 38).index_put_((h, torch.arange(38)), s)
    x_rows, dy_rows = x.detach().reshape(38, 24), dy.reshape(38, 40)
    x_til, dy_til = sketch @ x_rows, sketch @ dy_rows
    gamma_x = x_rows.norm() / (x_til.norm() + eps)
    gamma_dy = dy_rows.norm() / (dy_til.norm() + eps)
    dw = 2.0 * (1 - lam) ** 2 * gamma_x * gamma_dy * dy_til.t() @ x_til
    want = (
        torch.nn.functional.linear(x.detach(), w.detach(), b.detach()),
        dy @ w.detach(),
        dw,
        dy_rows.sum(0),
    )
    return all(
        torch.allclose(got, expect, rtol=1e-4, atol=1e-4)
        for route in grads
        for got, expect in zip(route, want, strict=True)
    )


def _self_check(dll: ctypes.CDLL) -> bool:
    for seed, balanced in ((2**64 - 1, True), (12345, False)):
        h, s = torch.empty(37, dtype=torch.int64), torch.empty(37)
        args = (seed, seed ^ SIGN_SALT, 37, 5, balanced, h.data_ptr(), s.data_ptr())
        if dll.basis_draw_count_sketch(*args) != 0:
            return False
        want_h, want_s = count_sketch_hashes(37, 5, balanced, seed)
        if not (torch.equal(h, want_h) and torch.equal(s, want_s)):
            return False
    rows = torch.randn(37, 1100, generator=torch.Generator().manual_seed(0))
    h, s = count_sketch_hashes(37, 5, True, 99)
    out, seeded, sums = torch.empty(5, 1100), torch.empty(5, 1100), torch.empty(1100)
    sq, sq_seeded = (ctypes.c_double * 2)(), (ctypes.c_double * 2)()
    args = (rows.data_ptr(), 37, 1100, 1100)
    if dll.basis_count_sketch_f32(
        *args, h.data_ptr(), s.data_ptr(), 5, out.data_ptr(), sq, None, 2
    ) or dll.basis_count_sketch_seeded_f32(
        *args,
        99,
        99 ^ SIGN_SALT,
        5,
        1,
        seeded.data_ptr(),
        sq_seeded,
        sums.data_ptr(),
        0.5,
        1,
        1e-8,
        2,
    ):
        return False
    expect = torch.zeros(5, 1100, dtype=torch.float64).index_add_(0, h, rows.double() * s[:, None])
    sq_rows, sq_out = sq[0], sq[1]
    gamma = math.sqrt(sq_rows) / (math.sqrt(sq_out) + 1e-8)
    return (
        torch.allclose(out.double(), expect, rtol=1e-5, atol=1e-5)
        and abs(sq_rows / rows.double().square().sum().item() - 1) < 1e-6
        and abs(sq_out / expect.square().sum().item() - 1) < 1e-6
        and tuple(sq_seeded) == tuple(sq)
        and torch.allclose(seeded.double(), expect * (0.5 * gamma), rtol=1e-5, atol=1e-5)
        and torch.allclose(sums.double(), rows.double().sum(0), rtol=1e-5, atol=1e-5)
    )


def cpu_signature() -> bytes:
    """-march=native code must not be reused on another CPU sharing the cache (e.g. over NFS)."""
    try:
        with open("/proc/cpuinfo", "rb") as f:
            lines = [ln for ln in f.read().splitlines() if ln.startswith((b"flags", b"model name"))]
        return b"\n".join(sorted(set(lines)))
    except OSError:
        return platform.processor().encode() + platform.machine().encode()


def _give_up(why: str, what: str = "compiled count sketch") -> None:
    warnings.warn(f"BASIS: {what} unavailable ({why}); using PyTorch ops", stacklevel=3)
    return None
