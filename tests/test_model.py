"""The GPT model: nanoGPT names and shapes, the paper's configuration, initialisations, and that
switching a method to BASIS changes exactly the selected layers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers_train import compose_config
from torch import nn

from basis import BasisLinear, apply_basis
from model import GPT, GPTConfig

PAPER = GPTConfig(
    block_size=64, vocab_size=50257, n_layer=2, n_head=2, n_embd=64, ln_eps=1e-6, init="flax"
)
SMALL = GPTConfig(
    block_size=16, vocab_size=101, n_layer=2, n_head=2, n_embd=32, ln_eps=1e-6, init="flax"
)
PAPER_LAYERS = [
    "transformer.h.0.mlp.c_fc",
    "transformer.h.0.mlp.c_proj",
    "transformer.h.1.mlp.c_fc",
    "transformer.h.1.mlp.c_proj",
    "lm_head",
]


def nanogpt_names(n_layer: int, bias: bool = True) -> list[str]:
    names = ["transformer.wte.weight", "transformer.wpe.weight"]
    for i in range(n_layer):
        for mod in ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj"):
            names.append(f"transformer.h.{i}.{mod}.weight")
            if bias:
                names.append(f"transformer.h.{i}.{mod}.bias")
    names += ["transformer.ln_f.weight"] + (["transformer.ln_f.bias"] if bias else [])
    return names + ["lm_head.weight"]


def test_parameter_names_and_shapes_follow_nanogpt() -> None:
    model = GPT(PAPER)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert list(shapes) == nanogpt_names(2)
    assert shapes["transformer.wte.weight"] == (50257, 64)
    assert shapes["transformer.wpe.weight"] == (64, 64)
    assert shapes["transformer.h.0.attn.c_attn.weight"] == (192, 64)
    assert shapes["transformer.h.1.mlp.c_fc.weight"] == (256, 64)
    assert shapes["transformer.h.1.mlp.c_proj.weight"] == (64, 256)
    assert shapes["lm_head.weight"] == (50257, 64)
    assert model.lm_head.bias is None  # untied head without bias
    assert model.transformer.wte.weight.data_ptr() != model.lm_head.weight.data_ptr()
    per_layer = 2 * 128 + (64 * 192 + 192) + (64 * 64 + 64) + (64 * 256 + 256) + (256 * 64 + 64)
    total = 50257 * 64 + 64 * 64 + 2 * per_layer + 128 + 64 * 50257
    assert sum(p.numel() for p in model.parameters()) == total
    assert model.get_num_params() == total - 64 * 64 - 50257 * 64


def test_forward_shapes_and_loss() -> None:
    torch.manual_seed(0)
    model = GPT(SMALL)
    idx = torch.randint(0, 101, (3, 16))
    logits, loss = model(idx, idx)
    assert logits.shape == (3, 16, 101)  # full logits when targets are given
    assert loss is not None and loss.ndim == 0
    assert abs(loss.item() - math.log(101)) < 1.0  # near uniform at init
    ref = F.cross_entropy(logits.view(-1, 101), idx.view(-1))
    torch.testing.assert_close(loss, ref)
    logits, loss = model(idx)
    assert logits.shape == (3, 1, 101) and loss is None  # inference: last position only
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_attention_is_causal() -> None:
    torch.manual_seed(0)
    model = GPT(SMALL).eval()
    idx = torch.randint(0, 101, (1, 16))
    changed = idx.clone()
    changed[0, 10:] = (changed[0, 10:] + 1) % 101
    a, _ = model(idx, idx)
    b, _ = model(changed, changed)
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_paper_model_config_is_spec_section_2() -> None:
    cfg = compose_config([])
    assert GPTConfig.from_dict(dict(cfg.model)) == PAPER
    model = GPT(PAPER)
    assert model.transformer.h[0].mlp.approximate == "tanh"
    assert model.transformer.h[0].ln_1.eps == 1e-6
    assert cfg.optim.name == "sgd" and cfg.optim.lr == 0.01 and cfg.optim.momentum == 0.9
    assert (cfg.train.steps, cfg.train.batch_size, cfg.train.block_size) == (50000, 1, 64)
    assert (cfg.eval.every, cfg.eval.chunks, cfg.seed, cfg.dtype) == (1000, 30, 42, "fp32")


def test_flax_initialisation_statistics() -> None:
    torch.manual_seed(0)
    model = GPT(PAPER)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            w = module.weight
            target = 1.0 / math.sqrt(module.in_features)
            assert abs(w.std().item() / target - 1) < 0.05, name
            # truncated at 2 standard deviations of the untruncated normal
            assert w.abs().max().item() <= 2 * target / 0.87962566103423978 + 1e-6, name
            if module.bias is not None:
                assert torch.count_nonzero(module.bias) == 0, name
    for emb in (model.transformer.wte.weight, model.transformer.wpe.weight):
        assert abs(emb.std().item() / (1 / 8) - 1) < 0.05
    # untruncated: the embeddings have tails beyond 2 sigma
    assert model.transformer.wte.weight.abs().max().item() > 3 / 8
    ln = model.transformer.h[0].ln_1
    assert torch.all(ln.weight == 1) and torch.all(ln.bias == 0)


def test_nanogpt_initialisation_and_tying() -> None:
    torch.manual_seed(0)
    cfg = GPTConfig(
        block_size=32, vocab_size=500, n_layer=4, n_head=4, n_embd=128, tie_weights=True
    )
    model = GPT(cfg)
    assert model.transformer.wte.weight is model.lm_head.weight
    assert abs(model.transformer.h[0].attn.c_attn.weight.std().item() - 0.02) < 0.002
    resid = 0.02 / math.sqrt(2 * 4)
    assert abs(model.transformer.h[0].mlp.c_proj.weight.std().item() - resid) < 0.1 * resid
    assert model.get_num_params() == sum(p.numel() for p in model.parameters()) - 32 * 128


def test_init_is_a_function_of_the_seed_only() -> None:
    torch.manual_seed(3)
    a = GPT(SMALL).state_dict()
    torch.manual_seed(3)
    b = GPT(SMALL).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_config_options_are_checked() -> None:
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="model.gelu"):
        GPTConfig(gelu="relu")
    with pytest.raises(ValueError, match="unknown model option"):
        GPTConfig.from_dict({"n_embd": 8, "heads": 2})
    exact = GPT(GPTConfig(**{**SMALL.__dict__, "gelu": "exact", "bias": False}))
    assert exact.transformer.h[0].mlp.approximate == "none"
    assert exact.transformer.h[0].ln_1.bias is None


def test_generate_appends_tokens() -> None:
    torch.manual_seed(0)
    model = GPT(SMALL).eval()
    idx = torch.zeros(2, 3, dtype=torch.long)
    g1 = torch.Generator().manual_seed(1)
    g2 = torch.Generator().manual_seed(1)
    out = model.generate(idx, 20, top_k=5, generator=g1)  # runs past block_size (crops context)
    assert out.shape == (2, 23) and torch.equal(out[:, :3], idx)
    assert torch.equal(out, model.generate(idx, 20, top_k=5, generator=g2))


def _grads(model: nn.Module, idx: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    _, loss = model(idx, idx)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize(
    ("preset", "expected"),
    [
        ("basis", PAPER_LAYERS),
        (
            "basis_all",
            [
                f"transformer.h.{i}.{m}"
                for i in range(2)
                for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
            ]
            + ["lm_head"],
        ),
    ],
)
def test_method_switch_changes_exactly_the_selected_layers(preset: str, expected: list) -> None:
    method = compose_config([f"method={preset}"]).method
    torch.manual_seed(0)
    exact = GPT(SMALL)
    torch.manual_seed(0)
    sketched = GPT(SMALL)
    replaced = apply_basis(sketched, list(method.layers), rank=4, lam=method.lam, seed=0)
    assert replaced == expected
    for name, module in sketched.named_modules():
        if isinstance(module, nn.Linear):
            assert isinstance(module, BasisLinear) == (name in expected), name
    # Same parameters, same forward: only the backward of the chosen layers differs.
    assert [n for n, _ in exact.named_parameters()] == [n for n, _ in sketched.named_parameters()]
    idx = torch.randint(0, 101, (2, 16), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(exact(idx, idx)[1], sketched(idx, idx)[1], rtol=0, atol=0)
    g_exact, g_sketch = _grads(exact, idx), _grads(sketched, idx)
    sketched_weights = {f"{n}.weight" for n in expected}
    for name in g_exact:
        if name in sketched_weights:
            assert not torch.allclose(g_exact[name], g_sketch[name]), name
        else:
            # biases of sketched layers and every other parameter: exact (dX is never sketched)
            torch.testing.assert_close(g_exact[name], g_sketch[name], rtol=1e-5, atol=1e-6)
