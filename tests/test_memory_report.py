"""scripts/memory_report.py: saved-for-backward bytes against sums worked out by hand."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))

import memory_report  # noqa: E402

from model.gpt import GPTConfig  # noqa: E402

F32, I64 = 4, 8
B, T, D, V, H = 2, 4, 8, 50, 2
ROWS = B * T


def _tiny() -> GPTConfig:
    return GPTConfig(block_size=T, vocab_size=V, n_layer=1, n_head=H, n_embd=D, bias=True)


def _exact_by_hand() -> dict[str, int]:
    """What each module saves in one training forward of the tiny model, fp32 / int64.

    The attention row follows torch's CPU SDPA kernel (torch 2.13): it saves q, k, v (views of
    the one c_attn output), its output and the logsumexp; c_proj's input is a view of that same
    output, so c_proj adds nothing of its own.
    """
    ln = ROWS * D * F32 + 2 * ROWS * F32  # input, mean, rstd
    return {
        "transformer.wte": B * T * I64,
        "transformer.wpe": T * I64,
        "transformer.h.0.ln_1": ln,
        "transformer.h.0.attn": ROWS * 3 * D * F32 + ROWS * D * F32 + B * H * T * F32,
        "transformer.h.0.attn.c_attn": ROWS * D * F32,
        "transformer.h.0.ln_2": ln,
        "transformer.h.0.mlp.c_fc": ROWS * D * F32,
        "transformer.h.0.mlp": ROWS * 4 * D * F32,  # GELU input
        "transformer.h.0.mlp.c_proj": ROWS * 4 * D * F32,
        "transformer.ln_f": ln,
        "lm_head": ROWS * D * F32,
        "": ROWS * V * F32 + B * T * I64 + F32,  # log-softmax output, targets, total_weight
    }


@pytest.fixture(scope="module")
def measured():
    return {
        (m.method, m.rank, m.layer_set): m
        for m in memory_report.run_measurements(
            "tiny",
            _tiny(),
            batch=B,
            seq=T,
            ranks=[3, ROWS],
            layer_sets=["paper", "all"],
            device=torch.device("cpu"),
        )
    }


def test_exact_matches_hand_computed_bytes(measured):
    exact = measured[("exact", None, None)]
    assert exact.per_module == _exact_by_hand()
    assert exact.saved_bytes == sum(_exact_by_hand().values()) == 6628
    assert exact.shared == {"transformer.h.0.attn.c_proj": ROWS * D * F32}
    params = sum(p.numel() for p in memory_report.GPT(_tiny()).parameters()) * F32
    assert exact.param_bytes == params


def test_basis_paper_layers_keep_r_rows(measured):
    exact, basis = measured[("exact", None, None)], measured[("basis", 3, "paper")]
    assert basis.sketched == ["transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj", "lm_head"]
    assert basis.per_module["transformer.h.0.mlp.c_fc"] == 3 * D * F32
    assert basis.per_module["transformer.h.0.mlp.c_proj"] == 3 * 4 * D * F32
    assert basis.per_module["lm_head"] == 3 * D * F32
    assert basis.linear_analytic["lm_head"] == 3 * D * F32
    freed = (ROWS - 3) * (D + 4 * D + D) * F32
    assert basis.saved_bytes == exact.saved_bytes - freed == 5668
    # Every other module saves what it saved under exact backprop.
    for name, nbytes in exact.per_module.items():
        if name not in basis.sketched:
            assert basis.per_module[name] == nbytes, name


def test_full_rank_keeps_as_much_as_exact(measured):
    exact, full = measured[("exact", None, None)], measured[("basis", ROWS, "paper")]
    assert full.saved_bytes == exact.saved_bytes


def test_sketching_attention_proj_frees_nothing_so_the_gap_shows(measured):
    """c_proj's input is still held by attention, so its sketch X̂ is extra, not a saving."""
    paper, all_ = measured[("basis", 3, "paper")], measured[("basis", 3, "all")]
    expected = paper.saved_bytes - (ROWS - 3) * D * F32 + 3 * D * F32
    assert all_.saved_bytes == expected == 5604
    text = memory_report.render_markdown(list(measured.values()), torch.device("cpu"))
    # Predicted assumes c_proj's input is freed; it is not (256 B), and X̂ comes on top (96 B).
    assert "| R=3 | all (5) | 5.47 KiB | -15.4% | 5.22 KiB | +256 B |" in text
    assert "| `h.*.attn.c_proj` | linear input | 0 B (256 B) + 256 B shared |" in text


def test_cli_writes_markdown_and_json(tmp_path):
    out, js = tmp_path / "m.md", tmp_path / "m.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPTS / "memory_report.py"),
            "--models",
            "paper",
            "--ranks",
            "8",
            "--layer-sets",
            "paper",
            "--out",
            str(out),
            "--json",
            str(js),
            "--threads",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert out.read_text().strip() == proc.stdout.strip()
    data = json.loads(js.read_text())
    exact, r8 = data
    assert exact["linear_analytic"]["lm_head"] == 64 * 64 * F32
    assert r8["per_module"]["lm_head"] == 8 * 64 * F32
    # The loss keeps the 64 x 50,257 log-softmax: it dwarfs everything BASIS touches (spec §3).
    assert exact["per_module"][""] == 64 * 50257 * F32 + 64 * I64 + F32
    assert "CUDA is not available" in proc.stdout or torch.cuda.is_available()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--models", "gpt5"], "unknown model"),
        (["--ranks", "0"], "--ranks"),
        (["--layer-sets", "attn"], "--layer-sets"),
        (["--models", "paper", "--seq", "65"], "block_size"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        memory_report.main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
