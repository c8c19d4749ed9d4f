"""Table 3 and Figure 1 of the paper, regenerated from run directories.

    python scripts/report.py runs/paper-shakespeare --out results/paper-shakespeare
    python scripts/report.py results/paper-shakespeare --seeds 1,2,3 --out results/paper-shakespeare
    python scripts/report.py --wandb ENTITY/basis:paper-shakespeare --out report/   # W&B API

Each argument is a run directory (``config.yaml``, ``metrics.jsonl``, ``summary.json`` as written
by train.py) or a folder holding run directories at any depth. Writes into ``--out``:

- ``TABLE.md``: per experiment, one row per method (exact, BASIS R = 64, 32, 16, 8, 1, then any
  ablation present): seeds, final train loss, final validation loss under the paper's protocol
  and on the fixed held-out set, each mean ± sample std over seeds; the paired difference to
  exact backprop over the seeds both have; the paper's numbers beside ours. Missing seeds,
  unfinished runs and unreadable directories are listed under "Missing or unfinished".
- ``figure1.png`` (and ``figure1_fixed.png`` when runs evaluated the fixed set): validation loss
  against step, mean over seeds with a ±1 std band, exact backprop highlighted, and a second
  panel on the last 20% of training. With several experiments, one figure per experiment.
- ``report.json``: the aggregated numbers.

Only finished runs enter the table and the figures (``--include-unfinished`` adds unfinished
runs to the figures, truncated to the steps all seeds of a row reached).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from _common import UsageError, fail, md_table, mean_se, mean_std, parse_int_list

from trainer.atomic import atomic_file

PROG = "report.py"
RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json")
FIXED_EVAL = "fixed_eval.json"  # written by train.py at the end, or by scripts/eval_fixed.py
SKIP_DIRS = {"checkpoints", "wandb", "__pycache__", ".git"}
MAX_DEPTH = 4

# Spec §2, Table 3 of the paper: final (train, val) losses at step 50,000, one seed each.
PAPER = {
    "exact": (6.718, 6.616),
    "basis-r64": (6.680, 6.573),
    "basis-r32": (6.735, 6.575),
    "basis-r16": (6.731, 6.675),
    "basis-r8": (6.798, 6.762),
    "basis-r1": (7.247, 7.221),
}
MAIN_ROWS = tuple(PAPER)
ABLATIONS = {  # issue 7's ablations, in table order
    "basis-r32-uniform": "uniform hashing",
    "basis-r8-noinv": "no invariant scalars",
    "basis-r8-gaussian": "Gaussian sketch",
}
# What each ablation changes, and so the run it is paired with (same rank and seed).
ABLATION_BASE = {
    "basis-r32-uniform": "basis-r32",
    "basis-r8-noinv": "basis-r8",
    "basis-r8-gaussian": "basis-r8",
}
_TAG = re.compile(r"^basis-r(\d+)(?:-(.+))?$")
_DIR = re.compile(r"^(?P<tag>.+)-s(?P<seed>\d+)$")


@dataclass
class Run:
    where: str  # a path, or wandb:<entity/project/id>
    experiment: str
    tag: str
    seed: int | None
    finished: bool
    steps_total: int | None
    last_step: int
    summary: dict[str, Any]
    curves: dict[str, list[tuple[int, float]]]  # "val_loss" / "val_loss_fixed" -> (step, value)
    rows_per_call: int | None  # batch_size · block_size: the rows a sketched layer sees
    mtime: float = 0.0
    fixed_chunks: list[float] | None = None  # per-chunk final losses (scripts/eval_fixed.py)
    problems: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Reading runs


def find_run_dirs(root: Path) -> list[Path]:
    if any((root / f).is_file() for f in RUN_FILES):
        return [root]
    found: list[Path] = []

    def walk(folder: Path, depth: int) -> None:
        try:
            children = sorted(p for p in folder.iterdir() if p.is_dir())
        except OSError:
            return
        for child in children:
            if child.name in SKIP_DIRS or child.name.startswith("."):
                continue
            if any((child / f).is_file() for f in RUN_FILES):
                found.append(child)
            elif depth < MAX_DEPTH:
                walk(child, depth + 1)

    walk(root, 1)
    return found


def method_tag(method: dict[str, Any]) -> str:
    """The trainer's run-name tag (trainer.run_dir.method_tag) for a config's method section."""
    try:
        from trainer.run_dir import method_tag as trainer_tag

        return trainer_tag(method)
    except (ImportError, KeyError, TypeError):
        # Results can be reported without the trainer's code (e.g. an old checkout): the core.
        if method.get("name") != "basis":
            return str(method.get("name", "unknown"))
        parts = [f"basis-r{method.get('rank')}"]
        if method.get("hashing", "balanced") != "balanced":
            parts.append(str(method["hashing"]))
        if method.get("invariant_scalars") is False:
            parts.append("noinv")
        return "-".join(parts)


def _read_metrics(path: Path) -> tuple[list[dict[str, Any]], int]:
    rows, torn = [], 0
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return rows, 0
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            torn += 1  # a run killed mid-write leaves half a line
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
    return rows, torn


def _curves(rows: Iterable[dict[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    curves: dict[str, dict[int, float]] = {"val_loss": {}, "val_loss_fixed": {}}
    for row in rows:
        for key, points in curves.items():
            value = row.get(key)
            if isinstance(value, int | float) and math.isfinite(value):
                points[row["step"]] = float(value)  # a resumed run rewrites a step: keep the last
    return {k: sorted(v.items()) for k, v in curves.items()}


def read_run(path: Path) -> Run:
    problems = []
    config: dict[str, Any] = {}
    config_path = path / "config.yaml"
    if config_path.is_file():
        try:
            loaded = yaml.safe_load(config_path.read_text())
            config = loaded if isinstance(loaded, dict) else {}
            if not config:
                problems.append("config.yaml is not a mapping")
        except (OSError, yaml.YAMLError) as err:
            problems.append(f"config.yaml unreadable ({type(err).__name__})")
    else:
        problems.append("no config.yaml")
    summary: dict[str, Any] = {}
    summary_path = path / "summary.json"
    if summary_path.is_file():
        try:
            loaded = json.loads(summary_path.read_text())
            summary = loaded if isinstance(loaded, dict) else {}
        except (OSError, ValueError):
            problems.append("summary.json unreadable")
    rows, torn = _read_metrics(path / "metrics.jsonl")
    if torn:
        problems.append(f"{torn} unreadable line(s) in metrics.jsonl")
    mtime = max((p.stat().st_mtime for p in path.iterdir() if p.is_file()), default=0.0)
    run = _make_run(str(path), config, summary, rows, problems, mtime, path.name, path.parent.name)
    run.fixed_chunks = _read_fixed_chunks(path / FIXED_EVAL, problems)
    return run


def _read_fixed_chunks(path: Path, problems: list[str]) -> list[float] | None:
    if not path.is_file():
        return None
    try:
        chunks = json.loads(path.read_text()).get("per_chunk")
    except (OSError, ValueError, AttributeError):
        chunks = None
    if not isinstance(chunks, list) or len(chunks) < 2:
        problems.append(f"{FIXED_EVAL} unreadable")
        return None
    if not all(isinstance(v, int | float) and math.isfinite(v) for v in chunks):
        problems.append(f"{FIXED_EVAL} holds non-finite losses")
        return None
    return [float(v) for v in chunks]


def _make_run(
    where: str,
    config: dict[str, Any],
    summary: dict[str, Any],
    rows: list[dict[str, Any]],
    problems: list[str],
    mtime: float,
    dir_name: str,
    parent_name: str,
) -> Run:
    dir_match = _DIR.match(dir_name)
    tag = summary.get("method_tag")
    if not tag and isinstance(config.get("method"), dict):
        tag = method_tag(config["method"])
    if not tag:
        tag = dir_match.group("tag") if dir_match else dir_name
    seed = summary.get("seed", config.get("seed"))
    if not isinstance(seed, int):
        seed = int(dir_match.group("seed")) if dir_match else None
    experiment = summary.get("experiment") or config.get("experiment_name") or parent_name
    train = config.get("train") if isinstance(config.get("train"), dict) else {}
    steps_total = train.get("steps", summary.get("steps"))
    rows_per_call = None
    if isinstance(train.get("batch_size"), int) and isinstance(train.get("block_size"), int):
        rows_per_call = train["batch_size"] * train["block_size"]
    finished = summary.get("finished") is True
    last_step = max((r["step"] for r in rows), default=int(summary.get("steps") or 0))
    return Run(
        where=where,
        experiment=str(experiment),
        tag=str(tag),
        seed=seed,
        finished=finished,
        steps_total=steps_total if isinstance(steps_total, int) else None,
        last_step=last_step,
        summary=summary,
        curves=_curves(rows),
        rows_per_call=rows_per_call,
        mtime=mtime,
        problems=problems,
    )


def runs_from_wandb(spec: str, api: Any = None) -> list[Run]:
    """Runs of a W&B project, ``ENTITY/PROJECT`` or ``ENTITY/PROJECT:GROUP``, via the public API.

    The trainer logs its resolved config, one row per logged step with ``step``, and summary.json
    as the run summary, so a W&B run maps onto a run directory's three files.
    """
    path, _, group = spec.partition(":")
    if path.count("/") != 1:
        raise UsageError(f"--wandb wants ENTITY/PROJECT or ENTITY/PROJECT:GROUP, got {spec!r}")
    if api is None:
        try:
            import wandb

            api = wandb.Api(timeout=30)
        except Exception as err:  # noqa: BLE001 - wandb raises many types when offline
            raise UsageError(f"cannot reach the W&B API ({type(err).__name__}: {err})") from None
    try:
        listed = list(api.runs(path, filters={"group": group} if group else None))
    except Exception as err:  # noqa: BLE001
        raise UsageError(f"cannot list W&B runs of {path} ({type(err).__name__}: {err})") from None
    out = []
    for r in listed:
        config = {k: v for k, v in dict(r.config).items() if not k.startswith("_")}
        summary = {k: v for k, v in dict(r.summary).items() if not k.startswith("_")}
        keys = ["step", "val_loss", "val_loss_fixed"]
        rows = [
            {k: row.get(k) for k in keys}
            for row in r.scan_history(keys=["step"])
            if isinstance(row.get("step"), int)
        ]
        out.append(
            _make_run(
                f"wandb:{'/'.join(r.path)}",
                config,
                summary,
                rows,
                [],
                0.0,
                str(r.name),
                group or path,
            )
        )
    return out


# ---------------------------------------------------------------------------------------------
# Aggregation


def row_label(tag: str) -> str:
    if tag == "exact":
        return "exact backprop"
    if tag in ABLATIONS:
        return f"{ABLATIONS[tag]}, R={_TAG.match(tag).group(1)}"
    match = _TAG.match(tag)
    if not match:
        return tag
    return f"BASIS R={match.group(1)}" + (f" ({match.group(2)})" if match.group(2) else "")


def row_order(tag: str) -> tuple:
    if tag in MAIN_ROWS:
        return (0, MAIN_ROWS.index(tag))
    if tag in ABLATIONS:
        return (1, list(ABLATIONS).index(tag))
    match = _TAG.match(tag)
    return (2, -int(match.group(1)) if match else 0, tag)


def rank_of(tag: str) -> int | None:
    match = _TAG.match(tag)
    return int(match.group(1)) if match else None


@dataclass
class Experiment:
    name: str
    runs: dict[tuple[str, int | None], Run]  # (tag, seed) -> the run used
    expected_seeds: list[int]
    notes: list[str]  # missing, unfinished, duplicates, problems


def group_runs(runs: Sequence[Run], seeds: Sequence[int] | None) -> list[Experiment]:
    by_exp: dict[str, list[Run]] = {}
    for run in runs:
        by_exp.setdefault(run.experiment, []).append(run)
    experiments = []
    for name in sorted(by_exp):
        notes: list[str] = []
        chosen: dict[tuple[str, int | None], Run] = {}
        for run in sorted(by_exp[name], key=lambda r: r.where):
            for problem in run.problems:
                notes.append(f"`{run.where}`: {problem}")
            key = (run.tag, run.seed)
            if key in chosen:
                # Prefer a finished run, then the further one, then the newer one.
                old = chosen[key]
                keep, drop = sorted(
                    (old, run), key=lambda r: (r.finished, r.last_step, r.mtime), reverse=True
                )
                notes.append(
                    f"duplicate {row_label(run.tag)} seed {run.seed}: using `{keep.where}`, "
                    f"ignoring `{drop.where}`"
                )
                chosen[key] = keep
            else:
                chosen[key] = run
        expected = (
            sorted(seeds)
            if seeds
            else sorted({r.seed for r in chosen.values() if r.seed is not None})
        )
        tags = set(MAIN_ROWS) | {t for t, _ in chosen}
        for tag in sorted(tags, key=row_order):
            present = {s for t, s in chosen if t == tag}
            missing = [s for s in expected if s not in present]
            if missing:
                notes.append(f"{row_label(tag)}: no run for seed(s) {', '.join(map(str, missing))}")
        for (tag, seed), run in sorted(
            chosen.items(), key=lambda kv: (row_order(kv[0][0]), str(kv[0][1]))
        ):
            if run.seed is None:
                notes.append(
                    f"`{run.where}`: seed unknown (no config.yaml, summary.json or -s<seed> name)"
                )
            if not run.finished:
                total = f" of {run.steps_total}" if run.steps_total else ""
                notes.append(
                    f"{row_label(tag)} seed {seed}: unfinished, at step {run.last_step}{total} "
                    f"(`{run.where}`); rerun its command to resume"
                )
        finished_steps = {r.steps_total for r in chosen.values() if r.finished and r.steps_total}
        if len(finished_steps) > 1:
            notes.append(
                "finished runs differ in train.steps "
                f"({', '.join(map(str, sorted(finished_steps)))}): their final losses are not comparable"
            )
        experiments.append(Experiment(name, chosen, expected, notes))
    return experiments


def _final(run: Run, key: str) -> float | None:
    value = run.summary.get(key)
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def _se(run: Run) -> float | None:
    if run.fixed_chunks:
        return mean_se(run.fixed_chunks)[1]
    for key in ("final_val_loss_fixed_se", "final_val_loss_fixed_stderr", "val_loss_fixed_se"):
        if isinstance(run.summary.get(key), int | float):
            return float(run.summary[key])
    return None


def aggregate(exp: Experiment) -> list[dict[str, Any]]:
    """One dict per table row: per-metric mean/std/n over finished seeds and paired differences."""
    tags = sorted(set(MAIN_ROWS) | {t for t, _ in exp.runs}, key=row_order)
    exact = _finished(exp, "exact")
    rows = []
    for tag in tags:
        finished = _finished(exp, tag)
        entry: dict[str, Any] = {
            "tag": tag,
            "label": row_label(tag),
            "rank": rank_of(tag),
            "seeds": sorted(s for s in finished if s is not None),
            "n": len(finished),
            "paper": PAPER.get(tag),
        }
        rows_per_call = {r.rows_per_call for r in finished.values() if r.rows_per_call}
        entry["rows_per_call"] = rows_per_call.pop() if len(rows_per_call) == 1 else None
        for key, name in (
            ("final_train_loss", "train"),
            ("final_val_loss", "val"),
            ("final_val_loss_fixed", "val_fixed"),
        ):
            values = [v for v in (_final(r, key) for r in finished.values()) if v is not None]
            mean, std = mean_std(values)
            entry[name] = {"mean": mean, "std": std, "n": len(values)}
            if tag != "exact":
                diffs = [
                    _final(r, key) - _final(exact[s], key)
                    for s, r in finished.items()
                    if s in exact
                    and _final(r, key) is not None
                    and _final(exact[s], key) is not None
                ]
                mean, std = mean_std(diffs)
                entry[f"d_{name}"] = {"mean": mean, "std": std, "n": len(diffs)}
        if tag != "exact":
            entry["pairs"] = _pairs(finished, exact)
            entry["d_val_fixed"]["se"] = _mean_pair_se(entry["pairs"])
        if tag in ABLATION_BASE:
            base = ABLATION_BASE[tag]
            pairs = _pairs(finished, _finished(exp, base))
            diffs = [p["d_val_fixed"] for p in pairs if p["d_val_fixed"] is not None]
            mean, std = mean_std(diffs)
            entry["vs_base"] = {
                "base": base,
                "label": row_label(base),
                "pairs": pairs,
                "d_val_fixed": {"mean": mean, "std": std, "n": len(diffs)},
            }
            entry["vs_base"]["d_val_fixed"]["se"] = _mean_pair_se(pairs)
        ses = [se for se in (_se(r) for r in finished.values()) if se is not None]
        entry["val_fixed"]["se"] = sum(ses) / len(ses) if ses else None
        ms = [v for v in (_final(r, "ms_per_step") for r in finished.values()) if v is not None]
        entry["ms_per_step"] = mean_std(ms)[0] if ms else None
        rows.append(entry)
    return rows


def _pair_se(exact: Run, run: Run) -> float | None:
    """SE of one seed's paired Δ on the fixed set: that of the per-chunk differences."""
    a, b = exact.fixed_chunks, run.fixed_chunks
    if not a or not b or len(a) != len(b):
        return None
    return mean_se([y - x for x, y in zip(a, b, strict=True)])[1]


def _finished(exp: Experiment, tag: str) -> dict[int | None, Run]:
    """The finished runs of one row, by seed."""
    return {s: r for (t, s), r in exp.runs.items() if t == tag and r.finished}


def _mean_pair_se(pairs: list[dict[str, Any]]) -> float | None:
    """Evaluation-set SE of the mean paired Δ on the fixed set over n seeds: sqrt(Σ SE²) / n.
    None unless every pair has per-chunk losses."""
    ses = [p["d_val_fixed_se"] for p in pairs]
    if not ses or any(se is None for se in ses):
        return None
    return math.sqrt(sum(se * se for se in ses)) / len(ses)


def _pairs(runs: dict[int | None, Run], refs: dict[int | None, Run]) -> list[dict[str, Any]]:
    """Each seed's paired differences to the reference run of that seed (exact backprop for a
    Δ column; the unablated method for an ablation)."""
    out = []
    for seed in sorted((s for s in runs if s in refs), key=str):
        run, ref = runs[seed], refs[seed]
        pair: dict[str, Any] = {"seed": seed}
        for key, name in (("final_val_loss", "d_val"), ("final_val_loss_fixed", "d_val_fixed")):
            a, b = _final(ref, key), _final(run, key)
            pair[name] = None if a is None or b is None else b - a
        pair["d_val_fixed_se"] = _pair_se(ref, run)
        out.append(pair)
    return out


# ---------------------------------------------------------------------------------------------
# Output


def _pm(stat: dict[str, Any] | None, signed: bool = False, with_n: bool = False) -> str:
    if not stat or not stat["n"]:
        return "–"
    fmt = "{:+.3f}" if signed else "{:.3f}"
    text = fmt.format(stat["mean"])
    if stat["n"] > 1:
        text += f" ± {stat['std']:.3f}"
    if with_n:
        text += f" (n={stat['n']})"
    return text


def _d_fixed(stat: dict[str, Any] | None) -> str:
    text = _pm(stat, signed=True, with_n=True)
    if stat and stat["n"] and stat.get("se") is not None:
        text = text[:-1] + f"; SE {stat['se']:.3f})"
    return text


def render_table(exp: Experiment, rows: list[dict[str, Any]]) -> str:
    table = []
    for e in rows:
        rank = e["rank"]
        if rank is None:
            r_cell = "–"
        elif e["rows_per_call"]:
            r_cell = f"{rank} ({e['rows_per_call'] / min(rank, e['rows_per_call']):g}×)"
        else:
            r_cell = str(rank)
        fixed = _pm(e["val_fixed"])
        if e["val_fixed"].get("se") is not None:
            fixed += f" (SE {e['val_fixed']['se']:.3f})"
        paper = e["paper"]
        table.append(
            [
                e["label"],
                r_cell,
                e["n"],
                _pm(e["train"]),
                _pm(e["val"]),
                fixed,
                "–" if e["tag"] == "exact" else _pm(e.get("d_val"), signed=True, with_n=True),
                "–" if e["tag"] == "exact" else _d_fixed(e.get("d_val_fixed")),
                f"{paper[0]:.3f}" if paper else "–",
                f"{paper[1]:.3f}" if paper else "–",
                f"{e['ms_per_step']:.1f}" if e["ms_per_step"] else "–",
            ]
        )
    headers = [
        "run",
        "R (compression)",
        "n",
        "train (final)",
        "val, paper protocol",
        "val, fixed set",
        "Δ val vs exact (paired)",
        "Δ val fixed vs exact (paired)",
        "paper train",
        "paper val",
        "ms/step",
    ]
    return md_table(headers, table)


def _pair_cells(pair: dict[str, Any]) -> list[str]:
    """A seed's two Δ cells: fixed set ± its evaluation SE, and the paper's protocol."""

    def cell(v: float | None, se: float | None = None) -> str:
        if v is None:
            return "–"
        return f"{v:+.3f}" + (f" ± {se:.3f}" if se is not None else "")

    return [cell(pair["d_val_fixed"], pair["d_val_fixed_se"]), cell(pair["d_val"])]


def render_pairs(rows: list[dict[str, Any]]) -> str:
    """One line per (row, seed): BASIS minus exact backprop of the same seed."""
    lines = [
        [e["label"], pair["seed"], *_pair_cells(pair)] for e in rows for pair in e.get("pairs", [])
    ]
    if not lines:
        return ""
    headers = ["run", "seed", "Δ val fixed (± eval SE)", "Δ val, paper protocol"]
    return md_table(headers, lines)


def render_ablations(rows: list[dict[str, Any]]) -> str:
    """Each ablation minus the method it changes, same rank and seed: does the changed part
    matter? One line per seed, then the mean over seeds."""
    lines = []
    for e in rows:
        vs = e.get("vs_base")
        if not vs or not vs["pairs"]:
            continue
        for pair in vs["pairs"]:
            lines.append([e["label"], vs["label"], pair["seed"], *_pair_cells(pair)])
        lines.append([e["label"], vs["label"], "mean", _d_fixed(vs["d_val_fixed"]), ""])
    if not lines:
        return ""
    headers = [
        "ablation",
        "minus",
        "seed",
        "Δ val fixed (± eval SE; mean: ± std)",
        "Δ val, paper protocol",
    ]
    return md_table(headers, lines)


def render_markdown(experiments: Sequence[Experiment], figures: dict[str, list[str]]) -> str:
    out = ["# Table 3, regenerated", ""]
    out.append(
        "Final losses as mean ± sample std over seeds (finished runs only; n = seeds). "
        "Δ: our row minus exact backprop of the same seed (same initialisation and batches), "
        "mean ± std over the n seeds both have. Paper: spec §2, Table 3 (one seed, FineWeb-edu, "
        'each row from a different initialisation). "val, paper protocol" is the mean over the '
        'next 30 chunks of a rolling validation stream; "val, fixed set" the same held-out '
        "chunks at every evaluation. ms/step: the runs' own training time per step (their "
        "summary.json), which depends on what else the machine was running."
    )
    out.append("")
    for exp in experiments:
        rows = aggregate(exp)
        seeds = ", ".join(map(str, exp.expected_seeds)) or "none"
        out.append(f"## `{exp.name}` (seeds: {seeds})")
        out.append("")
        out.append(render_table(exp, rows))
        out.append("")
        if any(e["val_fixed"].get("se") is not None for e in rows):
            out.append(
                "SE: the standard error due to the finite fixed set (scripts/eval_fixed.py's "
                "per-chunk losses; the larger of the i.i.d. and the 20-block batch-means estimate, "
                "since neighbouring chunks are correlated), for Δ that of the paired per-chunk "
                "differences. It is evaluation noise only; seed-to-seed variation is the ± std."
            )
        else:
            out.append(
                "No per-chunk fixed-set losses (scripts/eval_fixed.py), so no standard error."
            )
        out.append("")
        for title, body in (
            ("Paired differences per seed", render_pairs(rows)),
            ("Ablations against the method they change (paired by seed)", render_ablations(rows)),
        ):
            if body:
                out.extend([f"### {title}", "", body, ""])
        for fig in figures.get(exp.name, []):
            out.append(f"![validation loss]({fig})")
            out.append("")
        out.append("### Missing or unfinished")
        out.append("")
        out.extend([f"- {n}" for n in exp.notes] or ["- none: every row has every seed, finished."])
        out.append("")
    return "\n".join(out)


README_BLOCKS = ("table", "pairs", "ablations")


def update_readme(path: Path, experiment: Experiment) -> None:
    """Rewrite the blocks between ``<!-- report:NAME -->`` and ``<!-- /report:NAME -->`` in
    ``path`` (NAME: table, pairs, ablations) with this experiment's tables, so the README's
    numbers are always the ones TABLE.md holds. Raises UsageError if a marker pair is missing."""
    try:
        text = path.read_text()
    except OSError as err:
        raise UsageError(f"--readme {path}: {err.strerror}") from None
    rows = aggregate(experiment)
    content = {
        "table": render_table(experiment, rows),
        "pairs": render_pairs(rows) or "(none yet)",
        "ablations": render_ablations(rows) or "(none yet)",
    }
    for name in README_BLOCKS:
        pattern = re.compile(
            rf"(<!-- report:{name} -->\n).*?(\n<!-- /report:{name} -->)", flags=re.DOTALL
        )
        if not pattern.search(text):
            raise UsageError(
                f"--readme {path}: no '<!-- report:{name} -->' ... '<!-- /report:{name} -->' "
                "block; add the two marker lines where the table goes"
            )
        body = content[name]
        text = pattern.sub(lambda m, body=body: m.group(1) + body + m.group(2), text, count=1)
    with atomic_file(path) as f:
        f.write(text)


def _aligned(runs: Sequence[Run], key: str) -> tuple[list[int], list[list[float]]]:
    """The steps every run of a row evaluated, and each run's values at those steps."""
    curves = [dict(r.curves.get(key, [])) for r in runs]
    curves = [c for c in curves if c]
    if not curves:
        return [], []
    steps = sorted(set.intersection(*(set(c) for c in curves)))
    return steps, [[c[s] for s in steps] for c in curves]


def _zoom_rows(zoom: list[tuple[str, float, float, float]]) -> tuple[list, list]:
    """Split rows into those the zoomed panel scales to and far-above outliers (e.g. R = 1),
    which would otherwise squash the close rows the panel exists to separate: cut at the largest
    gap between final losses if it is over three times the spread of the rows below it."""
    ordered = sorted(zoom, key=lambda z: z[3])
    if len(ordered) < 3:
        return ordered, []
    finals = [z[3] for z in ordered]
    gaps = [(finals[i + 1] - finals[i], i) for i in range(len(finals) - 1)]
    gap, i = max(gaps)
    below = finals[i] - finals[0]
    if i == 0 or gap <= 3 * below:
        return ordered, []
    return ordered[: i + 1], ordered[i + 1 :]


def plot_figure(exp: Experiment, key: str, path: Path, include_unfinished: bool) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    by_tag: dict[str, list[Run]] = {}
    for (tag, _), run in exp.runs.items():
        if run.finished or include_unfinished:
            by_tag.setdefault(tag, []).append(run)
    series = []
    for tag in sorted(by_tag, key=row_order):
        steps, values = _aligned(by_tag[tag], key)
        if steps:
            series.append((tag, np.array(steps), np.array(values)))
    if not series:
        return False
    ranks = sorted({rank_of(t) for t, _, _ in series if t in MAIN_ROWS and rank_of(t)})
    cmap = plt.get_cmap("viridis")
    rank_color = {r: cmap(0.05 + 0.8 * i / max(len(ranks) - 1, 1)) for i, r in enumerate(ranks)}
    extra_colors = iter(["tab:red", "tab:orange", "tab:brown", "tab:pink", "tab:gray", "tab:cyan"])
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), constrained_layout=True)
    last = max(int(s[-1]) for _, s, _ in series)
    zoom_from = 0.8 * last
    zoom: list[tuple[str, float, float, float]] = []  # label, low, high, last mean
    for tag, steps, values in series:
        mean = values.mean(0)
        std = values.std(0, ddof=1) if len(values) > 1 else np.zeros_like(mean)
        if tag == "exact":
            style = dict(color="black", lw=2.6, zorder=10)
        elif tag in MAIN_ROWS:
            style = dict(color=rank_color[rank_of(tag)], lw=1.5, zorder=5)
        else:
            style = dict(color=next(extra_colors, "tab:olive"), lw=1.5, ls="--", zorder=4)
        label = f"{row_label(tag)} (n={len(values)})"
        for ax in axes:
            ax.plot(steps, mean, label=label, **style)
            if len(values) > 1:
                ax.fill_between(
                    steps,
                    mean - std,
                    mean + std,
                    color=style["color"],
                    alpha=0.15,
                    lw=0,
                    zorder=style["zorder"] - 1,
                )
        inside = steps >= zoom_from
        if inside.any():
            zoom.append(
                (
                    row_label(tag),
                    float((mean - std)[inside].min()),
                    float((mean + std)[inside].max()),
                    float(mean[-1]),
                )
            )
    protocol = (
        "paper protocol: rolling validation chunks" if key == "val_loss" else "fixed held-out set"
    )
    axes[0].set_title(f"{exp.name}: validation loss ({protocol})", fontsize=10)
    axes[1].set_title(f"last 20% of training (steps ≥ {zoom_from:,.0f})", fontsize=10)
    axes[1].set_xlim(zoom_from, last * 1.005)
    shown, off_scale = _zoom_rows(zoom)
    if shown:
        lo, hi = min(z[1] for z in shown), max(z[2] for z in shown)
        pad = 0.05 * (hi - lo) or 0.01
        axes[1].set_ylim(lo - pad, hi + pad)
    if off_scale:
        axes[1].text(
            0.02,
            0.98,
            "above this range: " + ", ".join(f"{z[0]} ({z[3]:.3f})" for z in off_scale),
            transform=axes[1].transAxes,
            va="top",
            fontsize=8,
            bbox=dict(facecolor="white", alpha=0.8, lw=0),
        )
    for ax in axes:
        ax.set_xlabel("step")
        ax.set_ylabel("validation loss")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="upper right")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _clean(value: Any) -> Any:
    """JSON without NaN (std of one seed): null, which every reader parses."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawTextHelpFormatter,
    )
    parser.add_argument("runs", nargs="*", type=Path, help="run directories or folders of them")
    parser.add_argument("--out", type=Path, required=True, help="where TABLE.md etc. go")
    parser.add_argument(
        "--seeds", default=None, help="expected seeds, e.g. 1,2,3 (default: every seed seen)"
    )
    parser.add_argument("--experiment", default=None, help="report only this experiment name")
    parser.add_argument(
        "--wandb",
        default=None,
        metavar="ENTITY/PROJECT[:GROUP]",
        help="also read runs through the W&B API (needs network and a key)",
    )
    parser.add_argument(
        "--include-unfinished", action="store_true", help="draw unfinished runs' curves too"
    )
    parser.add_argument(
        "--readme",
        type=Path,
        default=None,
        help="also rewrite the report:table, report:pairs and report:ablations blocks of this "
        "Markdown file\n"
        "(needs exactly one experiment, or --experiment)",
    )
    args = parser.parse_args(argv)
    try:
        if not args.runs and not args.wandb:
            raise UsageError("give at least one run directory (or --wandb)")
        seeds = parse_int_list(args.seeds, "--seeds", minimum=0) if args.seeds else None
        runs: list[Run] = []
        for root in args.runs:
            if not root.is_dir():
                raise UsageError(f"{root}: no such directory")
            dirs = find_run_dirs(root)
            if not dirs:
                raise UsageError(
                    f"{root}: no run directories (folders with {', '.join(RUN_FILES)}) found"
                )
            runs += [read_run(d) for d in dirs]
        if args.wandb:
            runs += runs_from_wandb(args.wandb)
        if args.experiment:
            runs = [r for r in runs if r.experiment == args.experiment]
            if not runs:
                raise UsageError(f"no runs of experiment {args.experiment!r}")
        try:
            args.out.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UsageError(f"cannot create --out {args.out}: {err.strerror}") from None
    except UsageError as err:
        fail(PROG, str(err))
    experiments = group_runs(runs, seeds)
    if args.readme is not None and len(experiments) != 1:
        names = ", ".join(e.name for e in experiments)
        fail(PROG, f"--readme needs one experiment, found {names}; pick one with --experiment")
    figures: dict[str, list[str]] = {}
    for exp in experiments:
        suffix = "" if len(experiments) == 1 else f"-{re.sub(r'[^A-Za-z0-9_.-]+', '_', exp.name)}"
        for key, stem in (("val_loss", "figure1"), ("val_loss_fixed", "figure1_fixed")):
            name = f"{stem}{suffix}.png"
            if plot_figure(exp, key, args.out / name, args.include_unfinished):
                figures.setdefault(exp.name, []).append(name)
    text = render_markdown(experiments, figures)
    (args.out / "TABLE.md").write_text(text + "\n")
    payload = {
        exp.name: {
            "seeds": exp.expected_seeds,
            "rows": aggregate(exp),
            "notes": exp.notes,
            "runs": [
                {
                    "where": r.where,
                    "tag": r.tag,
                    "seed": r.seed,
                    "finished": r.finished,
                    "last_step": r.last_step,
                    "steps": r.steps_total,
                }
                for r in exp.runs.values()
            ],
        }
        for exp in experiments
    }
    (args.out / "report.json").write_text(json.dumps(_clean(payload), indent=1) + "\n")
    print(text)
    if args.readme is not None:
        try:
            update_readme(args.readme, experiments[0])
        except UsageError as err:
            fail(PROG, str(err))
        print(f"updated the report blocks of {args.readme}")
    print(
        f"wrote {args.out / 'TABLE.md'}, report.json and {len(sum(figures.values(), []))} figure(s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
