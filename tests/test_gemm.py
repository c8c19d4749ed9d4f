"""basis/gemm.py: the oneDNN route for large CPU linears is F.linear to fp32 rounding, with the
same autograd, and falls back to F.linear everywhere else."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from basis import BasisLinear, apply_basis, gemm, native
from model.gpt import GPT, GPTConfig

BIG = (64, 64, 1100)  # rows x in -> out: 4.5 M multiply-adds >= gemm.MIN_MACS
SMALL = (64, 64, 256)  # the paper's MLP: below it


@pytest.fixture
def op_calls(monkeypatch):
    """Count the calls that reach the oneDNN operator."""
    calls = []
    real = gemm._op()

    def counting(*args):
        calls.append(tuple(args[0].shape))
        return real(*args)

    monkeypatch.setenv("BASIS_ONEDNN", "1")  # every large product to oneDNN, whatever is faster
    if gemm.onednn_available():
        monkeypatch.setattr(gemm, "_op", lambda: counting)
    return calls


def _inputs(rows, n_in, n_out, *, bias=True, leading=(), seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*leading, rows, n_in, generator=gen, requires_grad=True)
    w = (torch.randn(n_out, n_in, generator=gen) / n_in**0.5).requires_grad_()
    b = torch.randn(n_out, generator=gen).requires_grad_() if bias else None
    dy = torch.randn(*leading, rows, n_out, generator=gen)
    return x, w, b, dy


def _grads(fn, x, w, b, dy):
    for t in (x, w, b):
        if t is not None:
            t.grad = None
    y = fn(x, w, b)
    y.backward(dy)
    return y.detach(), [None if t is None else t.grad.clone() for t in (x, w, b)]


def test_self_check_passes_where_pytorch_has_onednn():
    has_op = torch.backends.mkldnn.is_available() and gemm._op() is not None
    assert gemm.onednn_available() == has_op


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("leading", [(), (2,)])
def test_fast_linear_matches_f_linear_values_and_grads(op_calls, bias, leading):
    x, w, b, dy = _inputs(*BIG, bias=bias, leading=leading)
    y_ref, g_ref = _grads(F.linear, x, w, b, dy)
    y, g = _grads(gemm.fast_linear, x, w, b, dy)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(g, g_ref, strict=True):
        if want is None:
            assert got is None
        else:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    if gemm.onednn_available():
        assert len(op_calls) == 2  # the forward and dX went through oneDNN


def test_small_products_stay_on_f_linear(op_calls):
    x, w, b, dy = _inputs(*SMALL)
    y_ref, g_ref = _grads(F.linear, x, w, b, dy)
    y, g = _grads(gemm.fast_linear, x, w, b, dy)
    with torch.no_grad():  # the input gradient on its own, as BASIS layers call it
        assert torch.equal(gemm.input_grad(dy, w), dy @ w)
    assert op_calls == []
    assert torch.equal(y, y_ref)
    assert all(torch.equal(a, b) for a, b in zip(g, g_ref, strict=True))


def test_env_switch_and_failed_self_check_fall_back_to_f_linear(monkeypatch, op_calls):
    x, w, b, _ = _inputs(*BIG)
    monkeypatch.setenv("BASIS_ONEDNN", "0")
    assert torch.equal(gemm.fast_linear(x, w, b), F.linear(x, w, b))
    monkeypatch.delenv("BASIS_ONEDNN")
    monkeypatch.setitem(gemm._state, "ok", False)
    assert torch.equal(gemm.fast_linear(x, w, b), F.linear(x, w, b))
    assert op_calls == []


def test_broken_operator_fails_the_self_check(monkeypatch):
    def broken(*args):
        raise RuntimeError("schema changed")

    monkeypatch.setattr(gemm, "_op", lambda: broken)
    assert gemm._self_check() is False

    def wrong(x, w, b, *rest):
        return F.linear(x, w, b) + 1.0

    monkeypatch.setattr(gemm, "_op", lambda: wrong)
    assert gemm._self_check() is False


def test_other_dtypes_and_frozen_weights(op_calls):
    x, w, b, dy = _inputs(*BIG)
    xd, wd = x.detach().double(), w.detach().double()
    assert torch.equal(gemm.fast_linear(xd, wd), F.linear(xd, wd))
    assert op_calls == []
    # A frozen weight: only dX flows, through the same oneDNN input gradient.
    w_frozen = w.detach()
    y = gemm.fast_linear(x, w_frozen, None)
    y.backward(dy)
    torch.testing.assert_close(x.grad, dy @ w_frozen, rtol=1e-5, atol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(gemm.fast_linear(x, w, b), F.linear(x, w, b))


def test_linear_module_is_a_plain_linear_for_users_and_apply_basis():
    layer = gemm.Linear(64, 1100)
    ref = nn.Linear(64, 1100)
    assert set(layer.state_dict()) == set(ref.state_dict())
    ref.load_state_dict(layer.state_dict())
    x = torch.randn(3, 64, 64)
    torch.testing.assert_close(layer(x), ref(x), rtol=1e-5, atol=1e-5)
    model = nn.Sequential(gemm.Linear(8, 8), nn.Linear(8, 8))
    assert apply_basis(model, ["*"], rank=2) == ["0", "1"]
    assert all(type(m) is BasisLinear for m in model)


def test_gpt_layers_use_it_and_basis_dx_stays_exact_on_the_onednn_path(monkeypatch):
    routes = []
    compiled = native.sketched_linear

    def spy(*args):
        routes.append(args[-2:])  # the libraries asked of the compiled operator
        return compiled(*args)

    monkeypatch.setattr(native, "sketched_linear", spy)
    model = GPT(GPTConfig(block_size=16, vocab_size=70000, n_layer=1, n_head=2, n_embd=64))
    assert type(model.lm_head) is gemm.Linear
    assert type(model.transformer.h[0].mlp.c_fc) is gemm.Linear
    x, w, _, dy = _inputs(64, 64, 70000, bias=False)
    layer = BasisLinear(64, 70000, bias=False, rank=8)
    layer.weight = nn.Parameter(w.detach().clone())
    y = layer(x)
    y.backward(dy)
    torch.testing.assert_close(x.grad, dy @ w.detach(), rtol=1e-5, atol=1e-4)
    # BasisLinear's products (in the compiled operator or in Python) run in the library gemm.py
    # picks for them, oneDNN at this size: equal bit for bit to its own calls.
    with torch.no_grad():
        assert torch.equal(y, gemm.linear(x, w))
        assert torch.equal(x.grad, gemm.input_grad(dy, w))
    if native.operator_available():
        assert routes == [(gemm.use_onednn(x, w), gemm.use_onednn(x, w, "input_grad"))]


needs_onednn = pytest.mark.skipif(not gemm.onednn_available(), reason="no oneDNN operator")


@pytest.fixture
def auto_mode(monkeypatch, tmp_path):
    """BASIS_ONEDNN=auto with an empty choice cache, as in a new process on a new machine."""
    monkeypatch.setenv("BASIS_ONEDNN", "auto")
    monkeypatch.setenv("BASIS_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(gemm, "_choices", {})
    return tmp_path / "gemm"


@needs_onednn
def test_auto_measures_once_per_machine_and_keeps_the_choice(monkeypatch, auto_mode):
    x, w, _, _ = _inputs(*BIG)
    timed = []
    monkeypatch.setattr(gemm, "_onednn_is_faster", lambda *key: timed.append(key) or True)
    assert gemm.use_onednn(x, w) and gemm.use_onednn(x, w)
    assert timed == [("forward", BIG[0], BIG[1], BIG[2])]  # measured once
    (stored,) = auto_mode.iterdir()
    assert stored.read_text() == "onednn\n" and "-forward-" in stored.name
    # A new process (empty memo) reads the machine's choice instead of measuring again.
    monkeypatch.setattr(gemm, "_choices", {})
    monkeypatch.setattr(gemm, "_onednn_is_faster", lambda *key: pytest.fail("measured again"))
    assert gemm.use_onednn(x, w)
    stored.write_text("mkl\n")  # the other library, as another machine state would have it
    monkeypatch.setattr(gemm, "_choices", {})
    assert not gemm.use_onednn(x, w)


@needs_onednn
def test_auto_forward_and_input_grad_are_chosen_apart(monkeypatch, auto_mode, op_calls):
    monkeypatch.setenv("BASIS_ONEDNN", "auto")  # op_calls pinned "1"; count calls under auto
    monkeypatch.setattr(gemm, "_onednn_is_faster", lambda direction, *shape: direction != "forward")
    x, w, b, dy = _inputs(*BIG)
    y_ref, g_ref = _grads(F.linear, x, w, b, dy)
    y, g = _grads(gemm.fast_linear, x, w, b, dy)
    assert op_calls == [(BIG[0], BIG[2])]  # only dX = dY W went to oneDNN (dY: rows × M)
    assert torch.equal(y, y_ref)  # the forward stayed in MKL
    torch.testing.assert_close(g[0], g_ref[0], rtol=1e-5, atol=1e-4)


@needs_onednn
def test_auto_remeasures_a_damaged_choice(monkeypatch, auto_mode):
    x, w, _, _ = _inputs(*BIG)
    monkeypatch.setattr(gemm, "_onednn_is_faster", lambda *key: False)
    assert not gemm.use_onednn(x, w)
    (stored,) = auto_mode.iterdir()
    stored.write_text("garbage")
    monkeypatch.setattr(gemm, "_choices", {})
    monkeypatch.setattr(gemm, "_onednn_is_faster", lambda *key: True)
    assert gemm.use_onednn(x, w)
    assert stored.read_text() == "onednn\n"


def test_the_first_stored_choice_stands(tmp_path):
    path = tmp_path / "gemm" / "key"
    gemm._store_first(path, "mkl")
    gemm._store_first(path, "onednn")  # a second process deciding at the same time
    assert path.read_text() == "mkl\n"
    gemm._store_first(path, "onednn", replace=True)
    assert path.read_text() == "onednn\n"
    assert [p.name for p in path.parent.iterdir()] == ["key"]  # no staged files left


@needs_onednn
def test_timing_both_libraries_gives_an_answer():
    for direction in ("forward", "input_grad"):
        assert gemm._onednn_is_faster(direction, 64, 64, 1100) in (True, False)


def test_bad_onednn_setting_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("BASIS_ONEDNN", "yes")
    with pytest.raises(ValueError, match="BASIS_ONEDNN must be one of auto, 1, 0; got 'yes'"):
        gemm.onednn_available()
