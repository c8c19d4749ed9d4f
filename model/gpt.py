"""A GPT language model in the style of nanoGPT, with the options the BASIS paper's model needs.

Parameter names follow nanoGPT (``transformer.wte``, ``transformer.h.0.mlp.c_fc``, ``lm_head``, ...)
so that BASIS layer patterns and checkpoints read the same as in nanoGPT.

Two initialisations:
- ``nanogpt``: N(0, 0.02) weights, residual projections scaled by 1/sqrt(2 * n_layer), zero biases.
- ``flax``: what the authors' Flax script gets from the framework defaults (spec §2): every dense
  kernel LeCun-normal (truncated normal with variance 1/fan_in), zero biases, both embeddings
  N(0, 1/n_embd).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

# nn.Linear with its large CPU GEMMs (the 64 x 50,257 head) run by oneDNN; see basis/gemm.py.
from basis.gemm import Linear

# JAX's truncated normal is cut at +-2 standard deviations and rescaled by this constant so that the
# *truncated* distribution has the requested variance (jax.nn.initializers.variance_scaling).
_TRUNC_STD_CORRECTION = 0.87962566103423978


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in the linear layers and LayerNorms (the head never has one)
    tie_weights: bool = False
    gelu: str = "tanh"  # "tanh" (approximation) | "exact" (erf)
    ln_eps: float = 1e-5
    init: str = "nanogpt"  # "nanogpt" | "flax"

    def __post_init__(self) -> None:
        for name, value in (
            ("block_size", self.block_size),
            ("vocab_size", self.vocab_size),
            ("n_layer", self.n_layer),
            ("n_head", self.n_head),
            ("n_embd", self.n_embd),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"model.{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(
                f"model.n_embd ({self.n_embd}) must be divisible by model.n_head ({self.n_head})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1), got {self.dropout!r}")
        if self.gelu not in ("tanh", "exact"):
            raise ValueError(f"model.gelu must be 'tanh' or 'exact', got {self.gelu!r}")
        if self.init not in ("nanogpt", "flax"):
            raise ValueError(f"model.init must be 'nanogpt' or 'flax', got {self.init!r}")
        if not self.ln_eps > 0:
            raise ValueError(f"model.ln_eps must be > 0, got {self.ln_eps!r}")

    @classmethod
    def from_dict(cls, d: dict) -> GPTConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown model option(s): {', '.join(unknown)}")
        return cls(**d)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_attn = Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)
        self.approximate = "tanh" if config.gelu == "tanh" else "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.c_fc(x), approximate=self.approximate)
        return self.dropout(self.c_proj(x))


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.ln_eps, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.ln_eps, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, eps=config.ln_eps, bias=config.bias),
            )
        )
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_weights:
            self.transformer.wte.weight = self.lm_head.weight
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise every parameter in a fixed module order, so a given torch seed gives the same
        model whatever happens to the module afterwards (e.g. BASIS replacing layers)."""
        cfg = self.config
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                if cfg.init == "flax":
                    std = math.sqrt(1.0 / module.in_features) / _TRUNC_STD_CORRECTION
                    nn.init.trunc_normal_(module.weight, std=std, a=-2 * std, b=2 * std)
                else:
                    std = 0.02
                    if name.endswith("c_proj"):
                        # GPT-2: residual-path projections shrink with depth.
                        std = 0.02 / math.sqrt(2 * cfg.n_layer)
                    nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        emb_std = 1.0 / math.sqrt(cfg.n_embd) if cfg.init == "flax" else 0.02
        if not cfg.tie_weights:  # a tied wte is the head, initialised above
            nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=emb_std)
        nn.init.normal_(self.transformer.wpe.weight, mean=0.0, std=emb_std)

    def get_num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; as in nanoGPT the position embedding is left out by default (and the
        token embedding too, unless it is a separate matrix from the head)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
            if not self.config.tie_weights:
                n -= self.transformer.wte.weight.numel()
        return n

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        _, t = idx.size()
        if t > self.config.block_size:
            raise ValueError(
                f"sequence length {t} exceeds the model's block_size {self.config.block_size}"
            )
        pos = torch.arange(0, t, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        if targets is not None:
            logits = self.lm_head(x)
            loss = F.cross_entropy(
                logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1
            )
        else:
            # Inference only needs the last position: skip the (T x vocab) head product.
            logits = self.lm_head(x[:, [-1], :])
            loss = None
        return logits, loss

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Sample ``max_new_tokens`` continuations of ``idx`` (B, T); call ``model.eval()`` first."""
        for _ in range(max_new_tokens):
            idx_cond = (
                idx if idx.size(1) <= self.config.block_size else idx[:, -self.config.block_size :]
            )
            logits, _ = self(idx_cond)
            logits = logits[:, -1, :] / max(temperature, 1e-8)
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("inf")
            probs = F.softmax(logits, dim=-1)
            idx_next = torch.multinomial(probs, num_samples=1, generator=generator)
            idx = torch.cat((idx, idx_next), dim=1)
        return idx
