"""What BASIS really frees: bytes autograd saves for backward, per layer and whole model.

    python scripts/memory_report.py                      # paper + GPT-2-small shapes, markdown
    python scripts/memory_report.py --models paper --ranks 32,1 --json mem.json --out MEMORY.md

Every tensor autograd saves during one training forward is seen by a ``saved_tensors_hooks`` pack
hook; tensors sharing a storage count once (the storage's bytes: that is what stays allocated),
and the model's parameters are excluded (they are alive anyway; reported separately). Each saved
storage is attributed to the innermost module whose forward was running when it was first saved
(module pre/post forward hooks keep a stack), so the per-layer rows add up to the whole-model row.
Operations written inline in a parent's forward (GELU in the MLP, attention in the attention
block, the loss in GPT.forward) show up under that parent.

Beside each linear layer: the analytic figure, B·T·N·4 bytes for an exact layer's input and
R_eff·N·4 for a BASIS layer's sketch X̂ (R_eff = min(R, B·T)). Beside each whole model: the exact
model's measured total minus what the sketched layers should free, so any storage that stays
alive for another reason shows up as a gap. On CUDA also ``torch.cuda.max_memory_allocated`` over
forward + backward (never nvidia-smi, spec §5).
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from _common import (
    ALL_LINEAR,
    PAPER_LAYERS,
    UsageError,
    fail,
    fmt_bytes,
    load_model_config,
    md_table,
    parse_int_list,
)
from torch import nn

from basis import BasisLinear, apply_basis
from model.gpt import GPT, GPTConfig

PROG = "memory_report.py"
LAYER_SETS: dict[str, tuple[str, ...]] = {"paper": PAPER_LAYERS, "all": ALL_LINEAR}
OUTSIDE = "(outside any module)"
DEFAULT_RANKS = (64, 32, 8, 1)


@dataclass
class Measurement:
    model: str
    method: str  # "exact" | "basis"
    rank: int | None
    layer_set: str | None  # key of LAYER_SETS, None for exact
    batch: int
    seq: int
    config: dict  # GPTConfig fields
    saved_bytes: int  # whole model, deduplicated by storage, parameters excluded
    param_bytes: int
    per_module: dict[str, int]  # module name ("" = the model itself) -> bytes first saved there
    shared: dict[str, int]  # module name -> bytes it saved that another module saved first
    linear_analytic: dict[str, int]  # linear module name -> analytic bytes of what it keeps
    module_names: list[str] = field(default_factory=list)  # model order (named_modules)
    sketched: list[str] = field(default_factory=list)
    cuda_peak_bytes: int | None = None  # max_memory_allocated during fwd+bwd, above the baseline
    cuda_after_forward_bytes: int | None = None  # allocated after forward, above the baseline

    @property
    def label(self) -> str:
        return "exact" if self.method == "exact" else f"R={self.rank}"


@dataclass
class SavedBytes:
    per_module: dict[str, int]  # storages first saved while this module's forward ran
    shared: dict[str, int]  # storages this module saved too, already counted for another one


def saved_bytes_by_module(
    model: nn.Module, forward: Callable[[], object]
) -> tuple[SavedBytes, object]:
    """Run ``forward()`` and return (bytes saved for backward per module, its output).

    The output is returned so the caller decides when the graph (and the saved tensors) die.
    """
    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    stack = [OUTSIDE]
    handles = []
    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(_push(stack, name)))
        handles.append(module.register_forward_hook(_pop(stack)))
    owners: dict[int, tuple[str, int]] = {}
    shared: set[tuple[str, int]] = set()

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        # ptr 0 is an empty storage; a parameter is alive whether or not autograd saves it.
        if not ptr or ptr in param_ptrs:
            return t
        if ptr not in owners:
            owners[ptr] = (stack[-1], storage.nbytes())
        elif owners[ptr][0] != stack[-1]:
            shared.add((stack[-1], ptr))
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = forward()
    finally:
        for handle in handles:
            handle.remove()
    per_module: dict[str, int] = {}
    for name, nbytes in owners.values():
        per_module[name] = per_module.get(name, 0) + nbytes
    also: dict[str, int] = {}
    for name, ptr in shared:
        also[name] = also.get(name, 0) + owners[ptr][1]
    return SavedBytes(per_module, also), out


def _push(stack: list[str], name: str) -> Callable:
    def hook(_module: nn.Module, _args: tuple) -> None:
        stack.append(name)

    return hook


def _pop(stack: list[str]) -> Callable:
    # Returns None on purpose: a forward hook's return value would replace the module's output.
    def hook(_module: nn.Module, _args: tuple, _output: object) -> None:
        stack.pop()

    return hook


def parameter_bytes(model: nn.Module) -> int:
    storages = {
        p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()
    }
    return sum(storages.values())


def linear_analytic_bytes(model: nn.Module, rows: int) -> dict[str, int]:
    """What each linear layer must keep: its input (B·T·N) if exact, X̂ (R_eff·N) if BASIS."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, BasisLinear):
            out[name] = min(module.rank, rows) * module.in_features * 4  # X̂ is fp32
        elif isinstance(module, nn.Linear):
            out[name] = rows * module.in_features * module.weight.element_size()
    return out


def measure_model(
    model: nn.Module,
    idx: torch.Tensor,
    targets: torch.Tensor,
    device: torch.device,
) -> tuple[SavedBytes, int | None, int | None]:
    """Saved bytes per module for one training step; on CUDA also the allocator's peak."""
    model.train()
    peak = after_forward = None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
    saved, (_, loss) = saved_bytes_by_module(model, lambda: model(idx, targets))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        after_forward = torch.cuda.memory_allocated(device) - baseline
        loss.backward()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - baseline
        model.zero_grad(set_to_none=True)
    del loss
    return saved, peak, after_forward


def run_measurements(
    model_name: str,
    config: GPTConfig,
    *,
    batch: int,
    seq: int,
    ranks: Sequence[int],
    layer_sets: Sequence[str],
    device: torch.device,
    seed: int = 0,
) -> list[Measurement]:
    """Exact, then BASIS at every rank for every layer set, on the same model and batch."""
    if seq > config.block_size:
        raise UsageError(f"--seq {seq} exceeds {model_name}'s block_size {config.block_size}")
    torch.manual_seed(seed)
    base = GPT(config).to(device)
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, config.vocab_size, (batch, seq), generator=gen).to(device)
    targets = torch.randint(0, config.vocab_size, (batch, seq), generator=gen).to(device)
    rows = batch * seq
    params = parameter_bytes(base)

    def record(model: nn.Module, method: str, rank: int | None, layer_set: str | None, sketched):
        saved, peak, after = measure_model(model, idx, targets, device)
        return Measurement(
            model=model_name,
            method=method,
            rank=rank,
            layer_set=layer_set,
            batch=batch,
            seq=seq,
            config=asdict(config),
            saved_bytes=sum(saved.per_module.values()),
            param_bytes=params,
            per_module=saved.per_module,
            shared=saved.shared,
            linear_analytic=linear_analytic_bytes(model, rows),
            module_names=[n for n, _ in model.named_modules()],
            sketched=list(sketched),
            cuda_peak_bytes=peak,
            cuda_after_forward_bytes=after,
        )

    results = [record(base, "exact", None, None, [])]
    for layer_set in layer_sets:
        for rank in ranks:
            model = copy.deepcopy(base)
            sketched = apply_basis(model, LAYER_SETS[layer_set], rank=rank, lam=0.01, seed=seed)
            results.append(record(model, "basis", rank, layer_set, sketched))
            del model
    return results


# ---------------------------------------------------------------------------------------------
# Markdown


def _what(name: str, model: nn.Module | None) -> str:
    """A few words on what a module's saved tensors are (for the README reader)."""
    if name == OUTSIDE:
        return "ops outside any module"
    if name == "":
        return "cross-entropy (log-softmax output, targets)"
    leaf = name.rsplit(".", 1)[-1]
    return {
        "wte": "token ids",
        "wpe": "position ids",
        "ln_1": "LayerNorm input, mean, rstd",
        "ln_2": "LayerNorm input, mean, rstd",
        "ln_f": "LayerNorm input, mean, rstd",
        "attn": "attention: q, k, v (one c_attn output), output, logsumexp",
        "mlp": "GELU input",
        "c_attn": "linear input",
        "c_proj": "linear input",
        "c_fc": "linear input",
        "lm_head": "linear input",
    }.get(leaf, "")


def _group_name(name: str) -> str:
    if name in ("", OUTSIDE):
        return "GPT (top level)" if name == "" else name
    return re.sub(r"^transformer\.", "", re.sub(r"\.h\.\d+\.", ".h.*.", "." + name)[1:])


def _module_order(measurements: Sequence[Measurement]) -> list[str]:
    """Modules that saved anything or are linear, in model order; the top level (loss) last."""
    used = set()
    for m in measurements:
        used |= set(m.per_module) | set(m.shared) | set(m.linear_analytic)
    order = [n for n in measurements[0].module_names if n and n in used]
    return order + [n for n in ("", OUTSIDE) if n in used]


def _cell(values: list[int], analytic: list[int] | None, shared: list[int]) -> str:
    def one(vs: list[int]) -> str:
        lo, hi = min(vs), max(vs)
        return fmt_bytes(lo) if lo == hi else f"{fmt_bytes(lo)}–{fmt_bytes(hi)}"

    text = one(values)
    if analytic:
        text += f" ({one(analytic)})"
    if any(shared):
        text += f" + {one(shared)} shared"
    return text


def per_layer_table(exact: Measurement, runs: Sequence[Measurement]) -> str:
    """Rows: module groups (blocks folded as h.*); cells: bytes per instance, (analytic)."""
    columns = [exact, *runs]
    order = _module_order(columns)
    groups: dict[str, list[str]] = {}
    for name in order:
        groups.setdefault(_group_name(name), []).append(name)
    rows = []
    for label, names in groups.items():
        count = f" (×{len(names)})" if len(names) > 1 else ""
        row = [f"`{label}`{count}", _what(names[0], None)]
        for m in columns:
            values = [m.per_module.get(n, 0) for n in names]
            analytic = [m.linear_analytic[n] for n in names if n in m.linear_analytic]
            shared = [m.shared.get(n, 0) for n in names]
            row.append(_cell(values, analytic or None, shared))
        rows.append(row)
    total = ["**whole model**", "", *[f"**{fmt_bytes(m.saved_bytes)}**" for m in columns]]
    rows.append(total)
    headers = ["module", "what it saves", *[m.label for m in columns]]
    return md_table(headers, rows)


def _signed_bytes(n: int) -> str:
    return "0" if n == 0 else ("+" if n > 0 else "-") + fmt_bytes(abs(n))


def whole_model_table(exact: Measurement, runs: Sequence[Measurement]) -> str:
    rows = []
    any_cuda = any(m.cuda_peak_bytes is not None for m in [exact, *runs])
    for m in [exact, *runs]:
        if m.method == "exact":
            predicted = exact.saved_bytes
            sketched = "–"
        else:
            # What exact keeps for these layers' inputs minus what BASIS keeps instead.
            freed = sum(exact.linear_analytic[n] - m.linear_analytic[n] for n in m.sketched)
            predicted = exact.saved_bytes - freed
            sketched = f"{m.layer_set} ({len(m.sketched)})"
        lin_measured = sum(m.per_module.get(n, 0) + m.shared.get(n, 0) for n in m.linear_analytic)
        lin_analytic = sum(m.linear_analytic.values())
        change = (m.saved_bytes - exact.saved_bytes) / exact.saved_bytes
        row = [
            m.label,
            sketched,
            fmt_bytes(m.saved_bytes),
            "–" if m.method == "exact" else f"{change:+.1%}",
            fmt_bytes(predicted),
            _signed_bytes(m.saved_bytes - predicted),
            f"{fmt_bytes(lin_measured)} / {fmt_bytes(lin_analytic)}",
        ]
        if any_cuda:
            row.append(fmt_bytes(m.cuda_peak_bytes) if m.cuda_peak_bytes is not None else "–")
        rows.append(row)
    headers = [
        "method",
        "sketched layers",
        "saved for backward",
        "vs exact",
        "predicted (exact − freed inputs)",
        "gap",
        "linear layers: measured / analytic",
    ]
    if any_cuda:
        headers.append("CUDA peak fwd+bwd")
    return md_table(headers, rows)


def render_markdown(measurements: Sequence[Measurement], device: torch.device) -> str:
    out = []
    by_model: dict[str, list[Measurement]] = {}
    for m in measurements:
        by_model.setdefault(m.model, []).append(m)
    for model_name, ms in by_model.items():
        exact = next(m for m in ms if m.method == "exact")
        shape = exact.config
        desc = ", ".join(
            f"{k} {shape[k]}" for k in ("n_embd", "n_layer", "n_head", "vocab_size", "tie_weights")
        )
        out.append(
            f"### `{model_name}`: B={exact.batch}, T={exact.seq} "
            f"→ {exact.batch * exact.seq} rows per linear call" + (f"; {desc}" if desc else "")
        )
        out.append("")
        out.append(
            f"Parameters ({fmt_bytes(exact.param_bytes)}) are not counted. Whole model, bytes "
            "saved for backward by one training forward:"
        )
        out.append("")
        out.append(whole_model_table(exact, [m for m in ms if m.method == "basis"]))
        out.append("")
        for layer_set in dict.fromkeys(m.layer_set for m in ms if m.layer_set):
            runs = [m for m in ms if m.layer_set == layer_set]
            patterns = ", ".join(f"`{p}`" for p in LAYER_SETS[layer_set])
            out.append(
                f"Per layer, BASIS on the {layer_set} layer set ({patterns}); bytes per "
                "instance, (analytic) for linear layers, + bytes the module also saved that "
                "an earlier module saved first (counted there):"
            )
            out.append("")
            out.append(per_layer_table(exact, runs))
            out.append("")
    if device.type != "cuda":
        out.append("CUDA is not available here: `torch.cuda.max_memory_allocated` not measured.")
        out.append("")
    return "\n".join(out)


def _json_ready(measurements: Sequence[Measurement]) -> list[dict]:
    return [asdict(m) for m in measurements]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawTextHelpFormatter,
    )
    parser.add_argument(
        "--models",
        default="paper,gpt2_small",
        help="comma list of configs/model/*.yaml names (default: paper,gpt2_small)",
    )
    parser.add_argument(
        "--ranks",
        default=",".join(map(str, DEFAULT_RANKS)),
        help="BASIS ranks R (default: 64,32,8,1)",
    )
    parser.add_argument(
        "--layer-sets",
        default="paper,all",
        help="paper (mlp c_fc, c_proj, lm_head) and/or all (every linear)",
    )
    parser.add_argument("--batch", type=int, default=1, help="sequences per batch (default 1)")
    parser.add_argument(
        "--seq",
        type=int,
        default=None,
        help="tokens per sequence (default: each model's block_size)",
    )
    parser.add_argument("--device", default="auto", help="auto (cuda if present) | cpu | cuda")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown here")
    args = parser.parse_args(argv)
    try:
        models = [m.strip() for m in args.models.split(",") if m.strip()]
        if not models:
            raise UsageError("--models is empty")
        configs = {m: GPTConfig.from_dict(load_model_config(m)) for m in models}
        ranks = parse_int_list(args.ranks, "--ranks")
        layer_sets = [s.strip() for s in args.layer_sets.split(",") if s.strip()]
        if not layer_sets or any(s not in LAYER_SETS for s in layer_sets):
            raise UsageError(
                f"--layer-sets must be a comma list of {', '.join(LAYER_SETS)}, "
                f"got {args.layer_sets!r}"
            )
        if args.batch < 1 or (args.seq is not None and args.seq < 1):
            raise UsageError("--batch and --seq must be positive")
        if args.device == "auto":
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        elif args.device in ("cpu", "cuda"):
            device = torch.device(args.device)
            if device.type == "cuda" and not torch.cuda.is_available():
                raise UsageError("--device cuda: CUDA is not available on this machine")
        else:
            raise UsageError(f"--device must be auto, cpu or cuda, got {args.device!r}")
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        measurements = []
        for name, config in configs.items():
            measurements += run_measurements(
                name,
                config,
                batch=args.batch,
                seq=args.seq or config.block_size,
                ranks=ranks,
                layer_sets=layer_sets,
                device=device,
            )
    except UsageError as err:
        fail(PROG, str(err))
    text = render_markdown(measurements, device)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(_json_ready(measurements), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
