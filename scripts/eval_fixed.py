"""Per-chunk losses of finished runs on the fixed held-out set, for standard errors and paired
differences (Table 3's "val, fixed set" column and its Δ).

    python scripts/eval_fixed.py runs/paper-shakespeare               # every finished run below
    python scripts/eval_fixed.py runs/paper-shakespeare/exact-s1 --copy-to results/paper-shakespeare

For each run directory with ``summary.json`` (finished) and ``checkpoints/final.pt``, rebuilds
the model from ``config.yaml``, loads the final weights (``weights_only=True``), evaluates every
chunk of the fixed set exactly as train.py did (same chunks, eval mode, where BASIS layers are
exact) and writes ``fixed_eval.json``: the per-chunk mean losses, their mean and its standard
error (``trainer.stats.fixed_eval_record``). The mean must reproduce summary.json's
``final_val_loss_fixed``; a run where it does not is reported and gets no file. Existing files
are kept (``--force`` recomputes). Runs trained by the current train.py already have the file (it
records the per-chunk losses of its final evaluation); this script is for runs made before that.
``--copy-to DIR`` also copies the file to ``DIR/<run name>/``, e.g. the committed results folder,
whose run directories hold no checkpoints.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import yaml
from _common import UsageError, fail
from report import find_run_dirs

from trainer.run_dir import RunDir

PROG = "eval_fixed.py"
MATCH_TOL = 1e-4  # fp32 summation order differs from train.py's evaluate() by ~1e-6


def eval_run(path: Path) -> dict:
    import torch

    from data import ValLoader, load_split, prepare_data
    from model.gpt import GPT, GPTConfig
    from trainer.checkpoint import load_checkpoint
    from trainer.evaluate import chunk_losses
    from trainer.stats import fixed_eval_record

    conf = yaml.safe_load((path / "config.yaml").read_text())
    summary = json.loads((path / "summary.json").read_text())
    state = load_checkpoint(path / "checkpoints" / "final.pt")
    model = GPT(GPTConfig.from_dict(conf["model"]))
    # BASIS layers keep a sketch counter as extra state; in eval mode they are plain linears.
    weights = {k: v for k, v in state["model"].items() if not k.endswith("._extra_state")}
    model.load_state_dict(weights)
    data_dir = prepare_data(conf["data"])
    val = load_split(data_dir, "val", vocab_size=conf["data"]["vocab_size"])
    ec, T = conf["eval"], conf["train"]["block_size"]
    loader = ValLoader(
        val, ec["fixed_batch_size"], T, protocol="fixed", num_chunks=ec["fixed_chunks"]
    )
    losses = chunk_losses(
        model,
        loader.eval_batches(),
        device=torch.device("cpu"),
        autocast=torch.autocast("cpu", enabled=False),
    )
    record = fixed_eval_record(losses, step=int(state["step"]), block_size=T)
    return {
        "run": path.name,
        **record,
        "summary_final_val_loss_fixed": summary.get("final_val_loss_fixed"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", type=Path, help="run directories or folders of them")
    parser.add_argument("--copy-to", type=Path, help="also copy each file to DIR/<run name>/")
    parser.add_argument("--force", action="store_true", help="recompute existing files")
    args = parser.parse_args(argv)
    try:
        dirs = []
        for root in args.paths:
            if not root.exists():
                raise UsageError(f"{root} does not exist")
            dirs += find_run_dirs(root)
        if not dirs:
            raise UsageError("no run directories (config.yaml, metrics.jsonl, summary.json) found")
    except UsageError as err:
        fail(PROG, str(err))
    bad = 0
    for path in dirs:
        run = RunDir(path)
        out = run.fixed_eval_path
        final = path / "checkpoints" / "final.pt"
        if not out.is_file() or args.force:
            if not final.is_file():
                print(
                    f"{path}: skipped (no checkpoints/final.pt: unfinished, or only its results were kept)"
                )
                continue
            result = eval_run(path)
            want = result["summary_final_val_loss_fixed"]
            if want is None or abs(result["mean"] - want) > MATCH_TOL:
                print(
                    f"{path}: MISMATCH, mean {result['mean']:.6f} vs summary {want}; no file written"
                )
                bad += 1
                continue
            run.write_fixed_eval(result)
        result = json.loads(out.read_text())
        print(
            f"{path}: {result['chunks']} chunks ({result['tokens']:,} tokens), "
            f"loss {result['mean']:.4f} ± {result['se']:.4f} (SE)"
        )
        if args.copy_to:
            dest = args.copy_to / path.name
            dest.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(out, dest / out.name)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
