"""scripts/estimator_quality.py on a tiny model: captured gradients, exact cases, the variance law."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))

import estimator_quality as eq  # noqa: E402

from model.gpt import GPT, GPTConfig  # noqa: E402

TINY = GPTConfig(
    block_size=16, vocab_size=97, n_layer=1, n_head=2, n_embd=16, ln_eps=1e-6, init="flax"
)
LAYERS = ["transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj", "lm_head"]
VARIANT = {v.key: v for v in eq.VARIANTS}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices: one thread is as fast, and far faster when other jobs share the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def captured():
    torch.manual_seed(0)
    model = GPT(TINY)
    stream = eq.Stream(eq.synthetic_tokens(TINY.vocab_size, 5000), 2, TINY.block_size)
    x, y = stream.next()
    caps, loss = eq.capture(model, x, y, LAYERS)
    # Autograd's own weight gradients from a separate step on the same batch.
    model.zero_grad()
    model(x, y)[1].backward()
    grads = {n: model.get_submodule(n).weight.grad.clone() for n in LAYERS}
    return {c.layer: c for c in caps}, grads, loss


def test_capture_gives_autograds_weight_gradient(captured):
    caps, grads, loss = captured
    assert loss > 0
    for name in LAYERS:
        assert caps[name].x.shape[0] == caps[name].dy.shape[0] == 2 * TINY.block_size
        torch.testing.assert_close(caps[name].exact, grads[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("key", ["basis", "balanced"])
def test_full_rank_balanced_is_exact_and_uniform_is_not(captured, key):
    cap = captured[0]["lm_head"]
    rows = cap.x.shape[0]
    cell = eq.measure_cell([cap], rows, VARIANT[key], draws=3, lam=0.0, seed=0, checkpoint="t")
    assert cell.rel_error < 1e-5 and abs(cell.cosine - 1) < 1e-6 and abs(cell.norm_ratio - 1) < 1e-5
    uniform = eq.measure_cell([cap], rows, VARIANT["uniform"], 3, 0.0, 0, "t")
    assert uniform.rel_error > 0.1


def test_shrinkage_scales_the_full_rank_estimate(captured):
    cap = captured[0]["transformer.h.0.mlp.c_fc"]
    cell = eq.measure_cell([cap], cap.x.shape[0], VARIANT["basis"], 2, 0.01, 0, "t")
    assert cell.norm_ratio == pytest.approx(0.99**2, abs=1e-5)


def test_rank_one_with_invariant_scalars_has_a_fixed_norm(captured):
    """R = 1, γ: Ĝ = γ_dY γ_X (S dY)ᵀ(S X) has norm exactly ‖dY‖_F ‖X‖_F on every draw."""
    cap = captured[0]["transformer.h.0.mlp.c_proj"]
    cell = eq.measure_cell([cap], 1, VARIANT["basis"], 4, 0.0, 0, "t")
    expected = float(cap.x.norm() * cap.dy.norm() / cap.exact.norm())
    assert cell.norm_ratio == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("key, rank", [("balanced", 8), ("uniform", 8), ("uniform", 32)])
def test_measured_mse_matches_the_closed_form(captured, key, rank):
    cap = captured[0]["transformer.h.0.mlp.c_fc"]
    cell = eq.measure_cell([cap], rank, VARIANT[key], 400, 0.0, 1, "t")
    assert cell.theory_mse_rel is not None
    assert cell.mse_rel == pytest.approx(cell.theory_mse_rel, rel=0.1)
    assert cell.bias_rel < 0.25 * cell.rel_error  # unbiased: the mean estimate converges


def test_collision_probability_and_the_spec_ratio():
    assert eq.collision_probability(64, 32, "balanced") == pytest.approx(1 / 63)
    assert eq.collision_probability(64, 64, "balanced") == 0
    assert eq.collision_probability(64, 1, "balanced") == 1
    assert eq.collision_probability(64, 100, "uniform") == pytest.approx(1 / 64)
    assert eq.collision_probability(10, 3, "balanced") == pytest.approx((12 + 6 + 6) / 90)
    for rank in (1, 2, 8, 16, 32, 64):
        ratio = eq.collision_probability(64, rank, "balanced") / eq.collision_probability(
            64, rank, "uniform"
        )
        assert ratio == pytest.approx((64 - rank) / 63)


def test_cross_term_energy_against_brute_force():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    dy = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    brute = 0.0
    for i, j in itertools.permutations(range(6), 2):
        a_ij, a_ji = torch.outer(dy[i], x[j]), torch.outer(dy[j], x[i])
        brute += float((a_ij * a_ij).sum() + (a_ij * a_ji).sum())
    assert eq.cross_term_energy(x, dy) == pytest.approx(brute, rel=1e-9)


def test_run_render_and_plot(tmp_path):
    tokens = eq.synthetic_tokens(TINY.vocab_size, 5000)
    cells, facts = eq.run(
        TINY,
        tokens,
        layers=eq.PAPER_LAYERS,
        ranks=[1, 4, 16],
        steps=5,
        draws=3,
        batches=1,
        lam=0.0,
        seed=0,
    )
    assert len(cells) == 2 * 3 * 3 * len(eq.VARIANTS)
    assert facts["layers"] == LAYERS and facts["rows"] == TINY.block_size
    settings = dict(model="tiny", data="synthetic", batches=1, draws=3, lam=0.0, seed=0)
    text = eq.render_markdown(cells, facts, settings)
    assert "#### At initialisation" in text and "#### After training" in text
    assert "| 16 | 0.000 | 0.000 [0.000, 0.000] |" in text  # R = rows: balanced is exact
    eq.plot(cells, facts, tmp_path / "q.png")
    assert (tmp_path / "q.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_quick(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPTS / "estimator_quality.py"),
            "--quick",
            "--model",
            "tiny",
            "--ranks",
            "1,32",
            "--draws",
            "2",
            "--threads",
            "1",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Shakespeare" in proc.stdout or "synthetic token stream" in proc.stdout
    data = json.loads((tmp_path / "estimator_quality.json").read_text())
    assert len(data["cells"]) == 2 * 5 * 2 * len(eq.VARIANTS)
    assert (tmp_path / "ESTIMATOR.md").read_text().strip() in proc.stdout
    assert (tmp_path / "estimator_quality.png").stat().st_size > 10_000


@pytest.mark.parametrize(
    "args, message",
    [
        (["--ranks", "x"], "--ranks"),
        (["--draws", "0"], "--draws"),
        (["--model", "nope"], "unknown model"),
        (["--lam", "1"], "--lam"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        eq.main([*args, "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_unprepared_corpus_falls_back_to_a_synthetic_stream_and_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("BASIS_DATA_DIR", str(tmp_path))
    tokens, desc = eq.load_tokens(50257, prepare=False)
    assert "synthetic token stream" in desc and "not prepared" in desc
    assert tokens.max() < 50257 and len(tokens) > 100_000
    assert (tokens == eq.synthetic_tokens(50257)).all()  # deterministic
    small, desc = eq.load_tokens(97, prepare=False)
    assert small.max() < 97 and "vocabulary" in desc
