"""The compiled count-sketch kernel (basis/native.py): same values as PyTorch ops, deterministic,
and a clean fallback to PyTorch ops when it cannot be built or is turned off."""

from __future__ import annotations

import shutil

import pytest
import torch

from basis import BasisLinear, basis_linear, gemm, native
from basis.functional import _SCALE_IN_SKETCH_MAX, _BasisLinearFn
from basis.sketch import Sketch, draw_sketch

needs_compiler = pytest.mark.skipif(
    native._compiler() is None, reason="no C compiler: the kernel is optional"
)


@pytest.fixture
def fresh_kernel(monkeypatch: pytest.MonkeyPatch, tmp_path):
    """An empty kernel cache and no kernel loaded yet in this process."""
    monkeypatch.setenv("BASIS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setitem(native._state, "tried", False)
    monkeypatch.setitem(native._state, "lib", None)
    return tmp_path / "cache"


def set_native(monkeypatch: pytest.MonkeyPatch, flag: str) -> None:
    """BASIS_NATIVE=flag, read afresh: the kernel and the operator read it at first use only."""
    monkeypatch.setenv("BASIS_NATIVE", flag)
    for state, loaded in ((native._state, "lib"), (native._op_state, "op")):
        monkeypatch.setitem(state, loaded, None)  # restored, with "tried", after the test
        monkeypatch.setitem(state, "tried", False)


def reference(rows: torch.Tensor, h: torch.Tensor, s: torch.Tensor, rank: int):
    """S rows and both squared norms in fp64, by the definition (a signed segment sum)."""
    rows64 = rows.double()
    out = torch.zeros(rank, rows.shape[1], dtype=torch.float64)
    out.index_add_(0, h, rows64 * s.double()[:, None])
    return out, rows64.square().sum().item(), out.square().sum().item()


def assert_matches_definition(rows, h, s, rank: int) -> None:
    out, sq_rows, sq_out = native.count_sketch(rows, h, s, rank)
    want, want_rows, want_out = reference(rows.contiguous(), h, s, rank)
    # fp32 sums of at most ceil(n / rank) terms; the norms are accumulated in double.
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    assert sq_rows == pytest.approx(want_rows, rel=1e-6)
    assert sq_out == pytest.approx(want_out, rel=1e-6)


@needs_compiler
@pytest.mark.parametrize(
    ("n", "k", "rank"),
    [
        (64, 64, 32),  # the paper's c_fc, one column block
        (64, 256, 1),  # R = 1: one signed sum
        (300, 1100, 7),  # more rows than the float partial sums hold (64); ragged blocks
        (64, 50257, 32),  # the paper's head: many blocks, shared among threads
        (5, 3, 8),  # rank > rows: empty bins stay zero
    ],
)
def test_matches_the_definition(n: int, k: int, rank: int) -> None:
    gen = torch.Generator().manual_seed(n + k + rank)
    rows = torch.randn(n, k, generator=gen)
    h = torch.randint(0, rank, (n,), generator=gen)
    s = torch.randint(0, 2, (n,), generator=gen).float() * 2 - 1
    assert_matches_definition(rows, h, s, rank)


@needs_compiler
def test_strided_rows_are_read_in_place() -> None:
    gen = torch.Generator().manual_seed(1)
    wide = torch.randn(40, 700, generator=gen)
    rows = wide[:, 50:650]  # row stride 700, not 600
    sk = draw_sketch(40, 8, "balanced", seed=1)
    assert_matches_definition(rows, sk.h, sk.s, sk.rank)


@needs_compiler
def test_rows_broadcast_from_one_row() -> None:
    # e.g. the gradient of (y * v).sum(): every row of dY is v, stored once (row stride 0).
    gen = torch.Generator().manual_seed(5)
    rows = torch.randn(300, generator=gen).expand(64, 300)
    assert rows.stride() == (0, 1)
    sk = draw_sketch(64, 8, "balanced", seed=5)
    assert_matches_definition(rows, sk.h, sk.s, sk.rank)


@needs_compiler
def test_bitwise_the_same_for_any_thread_count() -> None:
    # Per-block partial sums are combined in block order: 1 and 2 threads agree bit for bit, so
    # a resumed run reproduces an uninterrupted one whatever `threads` it was given.
    gen = torch.Generator().manual_seed(2)
    rows = torch.randn(64, 50257, generator=gen)
    sk = draw_sketch(64, 32, "balanced", seed=2)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(native.count_sketch(rows, sk.h, sk.s, sk.rank))
    finally:
        torch.set_num_threads(before)
    (a, a_rows, a_out), (b, b_rows, b_out) = results
    assert torch.equal(a, b) and a_rows == b_rows and a_out == b_out


@needs_compiler
def test_bad_bins_raise_instead_of_writing_out_of_bounds() -> None:
    rows = torch.randn(4, 16)
    s = torch.ones(4)
    with pytest.raises(ValueError, match=r"bin ids in \[0, 3\)"):
        native.count_sketch(rows, torch.tensor([0, 1, 3, 2]), s, 3)
    with pytest.raises(ValueError, match="bin ids"):
        Sketch(rank=3, h=torch.tensor([0, -1, 2, 2]), s=s).apply(rows)
    with pytest.raises(ValueError, match=r"one entry per row \(4\), got 3 and 4"):
        native.count_sketch(rows, torch.tensor([0, 1, 2]), s, 3)


@needs_compiler
def test_inputs_it_does_not_take_go_to_pytorch_ops() -> None:
    rows = torch.randn(8, 5)
    h = torch.randint(0, 2, (8,))
    s = torch.ones(8)
    assert native.count_sketch(rows, h, s, 2) is not None
    assert native.count_sketch(rows.double(), h, s, 2) is None  # fp64 rows
    assert native.count_sketch(rows.t().contiguous().t(), h, s, 2) is None  # column stride 8
    assert native.count_sketch(rows, h.int(), s, 2) is None  # int32 bins
    assert native.count_sketch(rows, torch.randint(0, 2, (16,))[::2], s, 2) is None


@needs_compiler
def test_sketch_routes_agree_with_and_without_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    gen = torch.Generator().manual_seed(3)
    rows = torch.randn(64, 256, generator=gen)
    sk = draw_sketch(64, 32, "balanced", seed=3)
    fused, gamma = sk.apply_with_gamma(rows, 1e-8)
    assert isinstance(gamma, float)  # the kernel's route: γ from its two norms
    set_native(monkeypatch, "0")
    plain, gamma_torch = sk.apply_with_gamma(rows, 1e-8)
    assert not isinstance(gamma_torch, float)  # PyTorch ops: a 0-dim tensor
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    assert gamma == pytest.approx(gamma_torch.item(), rel=1e-5)


@needs_compiler
def test_weight_gradient_is_the_same_with_and_without_the_kernel(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 32, 48, generator=gen)
    w = torch.randn(80, 48, generator=gen, requires_grad=True)
    dy = torch.randn(2, 32, 80, generator=gen)
    grads = []
    for flag in ("1", "0"):
        set_native(monkeypatch, flag)
        w.grad = None
        basis_linear(x, w, rank=8, lam=0.01, seed=11).backward(dy)
        grads.append(w.grad.clone())
    # Same seed, same h and s either way (rng.py); only fp32 rounding of the sums may differ,
    # so the tolerance is relative to dW's scale (another sketch would be off by O(scale)).
    scale = float(grads[0].abs().max())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6 * scale)


def test_no_compiler_warns_once_and_falls_back(
    monkeypatch: pytest.MonkeyPatch, fresh_kernel
) -> None:
    monkeypatch.setattr(native, "_compiler", lambda cpp=False: None)
    with pytest.warns(UserWarning, match="compiled count sketch unavailable .*no C compiler"):
        assert not native.available()
    rows = torch.randn(8, 5)
    assert native.count_sketch(rows, torch.zeros(8, dtype=torch.long), torch.ones(8), 1) is None
    x = torch.randn(16, 6)
    w = torch.randn(4, 6, requires_grad=True)
    basis_linear(x, w, rank=4, seed=0).sum().backward()  # PyTorch ops, no second warning
    assert w.grad is not None and torch.isfinite(w.grad).all()


def test_a_failing_compiler_falls_back(monkeypatch: pytest.MonkeyPatch, fresh_kernel) -> None:
    false = shutil.which("false")
    if false is None:
        pytest.skip("no `false` command to stand in for a broken compiler")
    monkeypatch.setattr(native, "_compiler", lambda cpp=False: false)
    with pytest.warns(UserWarning, match="could not build"):
        assert not native.available()
    assert not list(fresh_kernel.glob("*.so*"))  # nothing half-written left in the cache


def test_turned_off_by_environment(monkeypatch: pytest.MonkeyPatch, fresh_kernel) -> None:
    set_native(monkeypatch, "0")
    assert not native.available()
    assert not fresh_kernel.exists()  # not even built


@needs_compiler
def test_built_once_then_loaded_from_the_cache(
    monkeypatch: pytest.MonkeyPatch, fresh_kernel
) -> None:
    assert native.available()
    (built,) = fresh_kernel.glob("count_sketch-*.so")
    monkeypatch.setitem(native._state, "tried", False)
    monkeypatch.setattr(native, "_compile", lambda *a: pytest.fail("compiled a second time"))
    assert native.available()
    assert list(fresh_kernel.glob("count_sketch-*.so")) == [built]


@needs_compiler
@pytest.mark.parametrize("balanced", [True, False])
@pytest.mark.parametrize("invariant", [True, False])
def test_seeded_sketch_is_draw_then_sketch_then_scale(balanced: bool, invariant: bool) -> None:
    gen = torch.Generator().manual_seed(8)
    rows = torch.randn(150, 700, generator=gen)  # 150 rows: more than one float flush (64)
    seed = 2**64 - 99
    out, sq_rows, sq_out, sums = native.seeded_count_sketch(
        rows, 9, balanced, seed, colsum=True, mult=0.37, invariant=invariant, eps=1e-8
    )
    h, s = native.draw_count_sketch(150, 9, balanced, seed)
    plain, want_rows, want_out = native.count_sketch(rows, h, s, 9)
    assert (sq_rows, sq_out) == (want_rows, want_out)  # the same kernel on the same h and s
    gamma = (want_rows**0.5) / (want_out**0.5 + 1e-8) if invariant else 1.0
    torch.testing.assert_close(out, plain * (0.37 * gamma), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sums.double(), rows.double().sum(0), rtol=1e-5, atol=1e-5)
    unscaled, *_, no_sums = native.seeded_count_sketch(rows, 9, balanced, seed)
    assert torch.equal(unscaled, plain) and no_sums is None  # mult 0: left as summed


def _grads(fn, x, w, b, dy):
    for t in (x, w, b):
        if t is not None:
            t.grad = None
    y = fn()
    y.backward(dy)
    return [y.detach()] + [t.grad.clone() for t in (x, w, b) if t is not None]


@needs_compiler
@pytest.mark.parametrize(
    ("rows", "n_in", "n_out", "rank", "bias", "invariant", "hashing", "lam", "scale"),
    [
        (64, 64, 256, 32, True, True, "balanced", 0.01, 1.0),  # the paper's c_fc
        (64, 256, 64, 32, True, True, "balanced", 0.01, 1.0),  # c_proj: dŶ scaled in the kernel
        (16, 8, 5000, 8, False, True, "balanced", 0.0, 1.0),  # dŶ too large: X̂ scaled instead
        (64, 64, 256, 1, True, False, "balanced", 0.01, 1.0),  # R = 1: the outer product
        (37, 24, 40, 100, True, True, "uniform", 0.5, 3.0),  # rank > rows, uniform hashing
        (20, 8, 12, 4, True, True, "balanced", 0.0, 0.0),  # scale 0: a zero weight gradient
        (64, 64, 50257, 32, False, True, "balanced", 0.01, 1.0),  # the head: oneDNN's products
    ],
)
def test_operator_equals_the_python_path(
    rows, n_in, n_out, rank, bias, invariant, hashing, lam, scale
) -> None:
    """The compiled operator and _BasisLinearFn run the same kernel and GEMMs: equal bit for bit."""
    if not native.operator_available():
        pytest.skip("the compiled operator is unavailable here (no C++ compiler or headers)")
    gen = torch.Generator().manual_seed(rows + n_in + n_out + rank)
    x = torch.randn(1, rows, n_in, generator=gen, requires_grad=True)
    w = torch.randn(n_out, n_in, generator=gen, requires_grad=True)
    b = torch.randn(n_out, generator=gen, requires_grad=True) if bias else None
    dy = torch.randn(1, rows, n_out, generator=gen)
    seed = 2**64 - 7  # the top bit set: passed to the operator as a negative int64
    settings = (rank, lam, scale, 1e-8, invariant, hashing, seed, None, None)
    # the libraries basis_linear would pick for these products
    onednn = gemm.onednn_routes(x, w)
    op_args = (rank, lam, scale, 1e-8, invariant, hashing == "balanced", seed)
    op_args += (_SCALE_IN_SKETCH_MAX, *onednn)
    compiled = _grads(lambda: native.sketched_linear(x, w, b, *op_args), x, w, b, dy)
    python = _grads(lambda: _BasisLinearFn.apply(x, w, b, settings), x, w, b, dy)
    for got, want in zip(compiled, python, strict=True):
        assert torch.equal(got, want)
    if scale == 0.0:
        assert not compiled[2].any()


@needs_compiler
def test_layers_take_the_operator_where_it_applies() -> None:
    if not native.operator_available():
        pytest.skip("the compiled operator is unavailable here (no C++ compiler or headers)")
    layer = BasisLinear(16, 32, rank=4)
    x = torch.randn(2, 8, 16)
    assert "SketchedLinear" in layer(x).grad_fn.name()  # fp32 CPU: the C++ node
    assert layer.double()(x.double()).grad_fn.name() == "_BasisLinearFnBackward"  # fp64: Python
    gaussian = BasisLinear(16, 32, rank=4, hashing="gaussian")
    assert gaussian(x).grad_fn.name() == "_BasisLinearFnBackward"


@needs_compiler
def test_operator_keeps_only_the_sketch() -> None:
    if not native.operator_available():
        pytest.skip("the compiled operator is unavailable here (no C++ compiler or headers)")
    layer = BasisLinear(64, 256, rank=8)
    x = torch.randn(1, 64, 64, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    assert "SketchedLinear" in y.grad_fn.name()
    shapes = sorted(tuple(t.shape) for t in saved)
    assert shapes == [(8, 64), (256, 64)]  # X̂ (R × N) and the weight itself, not X (64 × 64)
    assert any(t is layer.weight or t.data_ptr() == layer.weight.data_ptr() for t in saved)


def test_self_check_rejects_a_wrong_operator() -> None:
    if not native.operator_available():
        pytest.skip("the compiled operator is unavailable here (no C++ compiler or headers)")
    op = native._registered_operator()
    assert native._operator_self_check(op)

    def other_sketch(x, w, b, rank, lam, scale, eps, inv, balanced, seed, *rest):
        return op(x, w, b, rank, lam, scale, eps, inv, balanced, seed + 1, *rest)

    def wrong_scale(x, w, b, rank, lam, scale, eps, inv, balanced, seed, *rest):
        return op(x, w, b, rank, lam, scale * 1.01, eps, inv, balanced, seed, *rest)

    assert not native._operator_self_check(other_sketch)
    assert not native._operator_self_check(wrong_scale)


def test_no_cpp_compiler_warns_and_falls_back(
    monkeypatch: pytest.MonkeyPatch, fresh_kernel
) -> None:
    monkeypatch.setitem(native._op_state, "tried", False)
    monkeypatch.setitem(native._op_state, "op", None)
    monkeypatch.setattr(native, "_registered_operator", lambda: None)  # as in a fresh process
    monkeypatch.setattr(native, "_compiler", lambda cpp=False: None if cpp else native_cc)
    with pytest.warns(UserWarning, match=r"compiled operator unavailable .*no C\+\+ compiler"):
        assert not native.operator_available()
    x = torch.randn(16, 6)
    w = torch.randn(4, 6, requires_grad=True)
    y = basis_linear(x, w, rank=4, seed=0)
    assert y.grad_fn.name() == "_BasisLinearFnBackward"
    y.sum().backward()
    assert w.grad is not None and torch.isfinite(w.grad).all()


def test_operator_turned_off_by_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    set_native(monkeypatch, "0")
    assert not native.operator_available()
    y = basis_linear(torch.randn(16, 6), torch.randn(4, 6, requires_grad=True), rank=4, seed=0)
    assert y.grad_fn.name() == "_BasisLinearFnBackward"


native_cc = native._compiler()


@needs_compiler
def test_prepare_builds_the_kernel_and_the_operator_now(monkeypatch: pytest.MonkeyPatch) -> None:
    for state, loaded in ((native._state, "lib"), (native._op_state, "op")):
        monkeypatch.setitem(state, loaded, None)
        monkeypatch.setitem(state, "tried", False)
    assert native.prepare() == native.operator_available()
    assert native._state["tried"] and native._op_state["tried"]  # nothing left for first use
    assert native._state["lib"] is not None


def test_build_cache_names_do_not_depend_on_paths(monkeypatch: pytest.MonkeyPatch, tmp_path):
    # Clones of the repo and new virtual environments must find the same build: the name hashes
    # what the library depends on, never where the source or PyTorch's headers live.
    monkeypatch.setenv("BASIS_CACHE_DIR", str(tmp_path))
    built = []
    monkeypatch.setattr(native, "_compile", lambda command, lib: built.append(lib) or True)
    a = native._built("x", [b"source", b"cc"], ["cc", "/one/clone/x.c", "-I/venv1/include"])
    b = native._built("x", [b"source", b"cc"], ["cc", "/other/clone/x.c", "-I/venv2/include"])
    c = native._built("x", [b"changed source", b"cc"], ["cc", "/one/clone/x.c"])
    assert a == b != c
