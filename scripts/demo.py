"""`make demo`: the paper's model on the embedded corpus, exact backprop vs BASIS at two ranks.

Trains `experiment=demo` three times (each run is a plain `python train.py ...`, so a finished
run is skipped and an interrupted one resumes when the demo is rerun), then prints a side-by-side
table and writes the validation curves to runs/demo/val_curves.png.

    python scripts/demo.py                      # exact, BASIS R=32, BASIS R=1
    python scripts/demo.py train.steps=1000     # extra overrides go to every run
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hydra import compose, initialize_config_dir  # noqa: E402

from trainer.config import validate  # noqa: E402
from trainer.metrics import read_metrics  # noqa: E402
from trainer.run_dir import resolve_run_dir  # noqa: E402

METHODS = {
    "exact": ["method=exact"],
    "BASIS R=32": ["method=basis", "method.rank=32"],
    "BASIS R=1": ["method=basis", "method.rank=1"],
}


def run_dir_for(overrides: list[str]) -> Path:
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "configs")):
        return resolve_run_dir(validate(compose(config_name="config", overrides=overrides)))


def fmt(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def table(summaries: dict[str, dict]) -> str:
    head = "| run | val loss (paper, 30 chunks) | val loss (fixed set) | train loss | tokens/s | ms/step |"
    lines = [head, "|---|---|---|---|---|---|"]
    for label, s in summaries.items():
        lines.append(
            f"| {label} | {fmt(s.get('final_val_loss'))} | {fmt(s.get('final_val_loss_fixed'))} | "
            f"{fmt(s.get('final_train_loss'))} | {fmt(s.get('tokens_per_s'), ',.0f')} | "
            f"{fmt(s.get('ms_per_step'), '.1f')} |"
        )
    return "\n".join(lines)


def plot(curves: dict[str, list[dict]], path: Path, steps: int) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a server
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, key, title in (
        (axes[0], "val_loss", "paper protocol (next 30 chunks)"),
        (axes[1], "val_loss_fixed", "fixed held-out set"),
    ):
        for label, rows in curves.items():
            pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), label=label, lw=2 if label == "exact" else 1.3)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("validation loss (nats/token)")
    axes[1].legend()
    fig.suptitle(f"BASIS vs exact backprop: paper model, Shakespeare, {steps:,} steps")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides passed to every run")
    args = parser.parse_args()
    base = ["experiment=demo", *args.overrides]

    start = time.perf_counter()
    summaries, curves, steps = {}, {}, 0
    for label, method in METHODS.items():
        overrides = [*base, *method]
        print(f"\n=== {label}: python train.py {' '.join(overrides)}", flush=True)
        proc = subprocess.run([sys.executable, str(REPO / "train.py"), *overrides], cwd=REPO)
        if proc.returncode != 0:
            print(f"demo: the {label} run failed (exit {proc.returncode})", file=sys.stderr)
            return proc.returncode
        run_dir = REPO / run_dir_for(overrides)
        summary = json.loads((run_dir / "summary.json").read_text())
        summaries[label] = summary
        curves[label] = read_metrics(run_dir / "metrics.jsonl")
        steps = summary["steps"]
        out_dir = run_dir.parent

    print(f"\nBASIS demo: {steps:,} steps each, batch 1 x 64 tokens, SGD 0.01/0.9, seed 42")
    print(table(summaries))
    png = out_dir / "val_curves.png"
    plot(curves, png, steps)
    (out_dir / "demo_table.md").write_text(table(summaries) + "\n")
    print(f"\nvalidation curves: {png.relative_to(REPO) if png.is_relative_to(REPO) else png}")
    print(f"demo wall time: {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
