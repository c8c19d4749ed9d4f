"""Train a GPT with exact backprop or BASIS on chosen linear layers.

    python train.py                                   # the paper's experiment (spec §2), exact
    python train.py method=basis method.rank=32       # the same with BASIS on MLP + head
    python train.py experiment=demo method=basis method.rank=1 logger=none
    python train.py -m method=basis method.rank=1,8,32 seed=1,2,3   # a Hydra multirun
    torchrun --nproc_per_node=2 train.py experiment=smoke   # DDP (trainer/distributed.py)

Under torchrun the global batch is train.batch_size x ranks x train.grad_accum rows.

The run directory (runs/<experiment>/<method tag>-s<seed>) is derived from the config, so the
same command resumes an unfinished run bit-identically and skips a finished one. Everything the
user can get wrong ends in one line ``error: ...`` on stderr and exit status 2.

Read top to bottom: config and run directory, data, model, optimizer, resume, the loop.
"""

from __future__ import annotations

import contextlib
import io
import os
import random
import sys
import time
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig

from basis import apply_basis, seed_sketches
from basis.native import prepare as prepare_native
from data import DataError, TrainLoader, ValLoader, load_split, prepare_data
from model import GPT, GPTConfig
from trainer.checkpoint import (
    CheckpointError,
    capture_rng,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)
from trainer.config import ConfigError, config_hash, validate
from trainer.distributed import (
    NullMetrics,
    barrier,
    cleanup,
    env_info,
    gather_to_main,
    init_distributed,
    mean_over_ranks,
    rank_seed,
    wrap_ddp,
)
from trainer.evaluate import chunk_losses, evaluate
from trainer.faults import (
    JobFailed,
    NonFiniteLoss,
    check_free_space,
    check_writable,
    checkpoint_bytes,
    remove_stale_temps,
)
from trainer.metrics import MetricsLog
from trainer.optim import build_optimizer, lr_at, set_lr
from trainer.run_dir import RunDir, git_commit, method_tag, resolve_run_dir, run_name
from trainer.runtime import (
    autocast_context,
    keep_freed_memory,
    peak_memory,
    pick_device,
    set_threads,
    synchronize,
)
from trainer.stats import fixed_eval_record
from trainer.wandb_logger import NullLogger, make_logger, new_run_id

VAL_KEYS = {"paper": "val_loss", "fixed": "val_loss_fixed"}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(cfg: DictConfig | dict[str, Any]) -> dict[str, Any]:
    """Run, resume or skip the run ``cfg`` describes; return its summary."""
    # ---- config and run directory -------------------------------------------------------------
    conf = validate(cfg)
    # Under torchrun (trainer/distributed.py): every rank runs this function; rank 0 alone writes.
    dist_info = init_distributed(pick_device(conf["device"]).type)
    main_rank = dist_info.is_main
    run = RunDir(resolve_run_dir(conf))
    status = run.status(conf, conf["resume"])
    barrier(dist_info)  # every rank has read the directory before rank 0 writes to it
    if main_rank and status != "finished":
        check_writable(run.path)
        remove_stale_temps(run.checkpoint_dir)
    if status == "finished":
        summary = run.read_summary() or {}
        print(
            f"{run.path}: already finished ({summary.get('steps')} steps, val loss "
            f"{_fmt(summary.get('final_val_loss'))}); nothing to do",
            flush=True,
        )
        return summary
    tc, ec, mc = conf["train"], conf["eval"], conf["method"]
    steps, log_every = tc["steps"], tc["log_every"]
    threads = set_threads(conf["threads"])
    keep_freed_memory()  # several ms per step on CPU at the paper's size; see its docstring
    device = pick_device(conf["device"])
    if dist_info.enabled and device.type == "cuda":
        device = torch.device("cuda", dist_info.local_rank)
    autocast = autocast_context(device, conf["dtype"])

    # ---- data -----------------------------------------------------------------------------------
    data_dir = prepare_data(conf["data"])
    vocab, verify = conf["data"]["vocab_size"], conf["data"]["verify"]
    if vocab > conf["model"]["vocab_size"]:
        raise ConfigError(
            f"data.vocab_size={vocab} exceeds model.vocab_size={conf['model']['vocab_size']}"
        )
    train_tokens = load_split(data_dir, "train", vocab_size=vocab, verify=verify)
    val_tokens = load_split(data_dir, "val", vocab_size=vocab, verify=verify)
    T = tc["block_size"]
    train_loader = TrainLoader(
        train_tokens,
        tc["batch_size"],
        T,
        order=tc["order"],
        seed=conf["seed"],
        rank=dist_info.rank,
        world_size=dist_info.world_size,
    )
    val_loaders = {}
    if "paper" in ec["protocols"]:
        val_loaders["paper"] = ValLoader(
            val_tokens, ec["batch_size"], T, protocol="paper", num_chunks=ec["chunks"]
        )
    if "fixed" in ec["protocols"]:
        val_loaders["fixed"] = ValLoader(
            val_tokens, ec["fixed_batch_size"], T, protocol="fixed", num_chunks=ec["fixed_chunks"]
        )

    # ---- model ------------------------------------------------------------------------------------
    # Initialise under the run seed *before* BASIS swaps layers (its sketches never touch torch's
    # RNG), so exact and BASIS runs of one seed start from the same weights: paired runs.
    seed_everything(conf["seed"])
    model = GPT(GPTConfig.from_dict(conf["model"]))
    basis_layers: list[str] = []
    if mc["name"] == "basis":
        basis_layers = apply_basis(
            model,
            mc["layers"],
            rank=mc["rank"],
            lam=mc["lam"],
            scale=mc["scale"],
            eps=mc["eps"],
            invariant_scalars=mc["invariant_scalars"],
            hashing=mc["hashing"],
            seed=conf["seed"],
        )
        if device.type == "cpu":
            prepare_native()  # build BASIS's CPU code now, not inside the first timed step
    own_seed = rank_seed(conf["seed"], dist_info.rank)
    if dist_info.enabled:  # each rank its own dropout and sketches; rank 0 keeps the run seed's
        seed_everything(own_seed % 2**32)  # numpy takes 32-bit seeds
        seed_sketches(model, own_seed)
    model.to(device)
    optimizer = build_optimizer(model, conf["optim"], device.type)
    if main_rank:
        check_free_space(
            run.path,
            checkpoint_bytes(model, conf["optim"]["name"], conf["optim"].get("momentum", 0.0)),
        )

    # ---- resume -----------------------------------------------------------------------------------
    step, tokens, elapsed_prev, train_time = 0, 0, 0.0, 0.0
    last: dict[str, float | None] = {"train_loss": None, "val_loss": None, "val_loss_fixed": None}
    # A resumed run keeps the identity of its config.yaml as first written (newer code may have
    # added keys since; see trainer.config.ADDED_KEYS); a fresh run's config.yaml is written below.
    chash = config_hash((status == "resume" and run.read_config()) or conf)
    if status == "resume":
        ckpt_path = run.checkpoint()
        assert ckpt_path is not None
        state = load_checkpoint(ckpt_path)
        if state.get("config_hash") != chash:
            raise CheckpointError(
                f"{ckpt_path} was written by a different config "
                f"(hash {state.get('config_hash')} != {chash}); delete the run dir"
            )
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, KeyError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"{ckpt_path} does not fit this model: {first}") from e
        if dist_info.enabled:  # the sketch seeds came from rank 0's checkpoint; counters stay
            seed_sketches(model, own_seed)
        train_loader.load_state_dict(state["train_loader"])
        for proto, loader in val_loaders.items():
            loader.load_state_dict(state["val_loaders"][proto])
        restore_rng(state["rng_ranks"][dist_info.rank] if dist_info.enabled else state["rng"])
        step, tokens = state["step"], state["tokens"]
        elapsed_prev, train_time = state["elapsed_s"], state["train_time_s"]
        last.update(state["last"])
        skipped = state.get("skipped_steps", 0)
        last_good = f"{ckpt_path} (step {step})"
        wandb_id = state["wandb_id"]
        print(f"{run.path}: resuming from step {step} ({ckpt_path.name})", flush=True)
    else:
        if main_rank:
            run.write_config(conf)
        wandb_id = new_run_id()
        skipped, last_good = 0, "none (no checkpoint written yet)"
    # Rows past the checkpoint (or all rows, on a fresh start) are recomputed, never duplicated.
    metrics = (
        MetricsLog(run.metrics_path, keep_until_step=step if status == "resume" else -1)
        if main_rank
        else NullMetrics()
    )
    name = run_name(conf)
    logger = (
        NullLogger()
        if not main_rank
        else make_logger(
            conf["logger"],
            run_dir=run.path,
            run_id=wandb_id,
            name=name,
            config={**conf, "run_dir": str(run.path)},
            tags=[conf["experiment_name"], method_tag(mc), f"seed{conf['seed']}"],
        )
    )
    fwd_model = torch.compile(model) if conf["compile"] else model
    # Training steps go through DDP (gradient all-reduce); evaluation uses the bare model (rank 0).
    ddp, step_model = wrap_ddp(model, fwd_model, device, dist_info, conf["compile"])

    def checkpoint_state() -> dict[str, Any]:
        rng_ranks = gather_to_main(capture_rng(), dist_info)  # a collective: every rank calls it
        return {
            "step": step,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "train_loader": train_loader.state_dict(),
            "val_loaders": {p: v.state_dict() for p, v in val_loaders.items()},
            "rng": capture_rng(),
            "tokens": tokens,
            "elapsed_s": elapsed_prev + (time.perf_counter() - t_start),
            "train_time_s": train_time,
            "last": dict(last),
            "wandb_id": wandb_id,
            "config_hash": chash,
            "skipped_steps": skipped,
            **({"rng_ranks": rng_ranks} if dist_info.enabled else {}),
        }

    def save(path: Any) -> None:
        state = checkpoint_state()
        if main_rank:
            save_checkpoint(path, state)
        barrier(dist_info)

    final_fixed: list[float] = []  # the fixed set's per-chunk losses at the last step

    def run_evals(protocols: list[str], final: bool = False) -> dict[str, float]:
        if not main_rank:
            return {}
        out = {}
        for p, v in val_loaders.items():
            if p not in protocols:
                continue
            if p == "fixed" and final:  # per chunk, for its standard error (fixed_eval.json)
                final_fixed[:] = chunk_losses(
                    fwd_model, v.eval_batches(), device=device, autocast=autocast
                )
                out[VAL_KEYS[p]] = sum(final_fixed) / len(final_fixed)
            else:
                out[VAL_KEYS[p]] = evaluate(
                    fwd_model, v.eval_batches(), device=device, autocast=autocast
                )
        return out

    def due_evals(step: int) -> list[str]:
        every = {"paper": ec["every"], "fixed": ec["fixed_every"]}
        return [p for p in val_loaders if step % every[p] == 0 or step == steps]

    # ---- the loop ---------------------------------------------------------------------------------
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"{run.path}: {name} | {n_params:,} params | BASIS on {len(basis_layers)} layers | "
        f"{device} x{threads} threads | steps {step} -> {steps}",
        flush=True,
    )
    tokens_per_step = tc["batch_size"] * dist_info.world_size * T * tc["grad_accum"]
    stop_at = tc["stop_at"] or steps
    t_start = time.perf_counter()
    window_loss = torch.zeros((), device=device)  # summed on device: no host sync per step
    window_steps, window_time, window_skipped = 0, 0.0, 0
    progress = _progress_bar(conf["progress"], step, steps)
    model.train()
    try:
        if step == 0 and ec["at_start"] and val_loaders:
            row = {"step": 0, **run_evals(list(val_loaders)), "tokens": 0, "elapsed_s": 0.0}
            last.update(row)
            metrics.write(row)
            logger.log(row, step=0)
            barrier(dist_info)
        while step < stop_at:
            step += 1
            lr = lr_at(step, conf["optim"], steps)
            set_lr(optimizer, lr)
            t0 = time.perf_counter()
            step_loss = torch.zeros((), device=device)
            for micro in range(tc["grad_accum"]):
                x, y = train_loader.next_batch()
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                # Under DDP, all-reduce the gradients once per step, after the last micro-batch.
                last_micro = micro == tc["grad_accum"] - 1
                with contextlib.nullcontext() if ddp is None or last_micro else ddp.no_sync():
                    with autocast:
                        _, loss = step_model(x, y)
                    # Dividing by 1 would be a no-op op per step; skip it in the paper's setting.
                    (loss if tc["grad_accum"] == 1 else loss / tc["grad_accum"]).backward()
                step_loss += loss.detach()
            mean_over_ranks(step_loss, dist_info)  # every rank logs and decides on the same loss
            # One host sync per step (free on CPU; with log_every=1 it happens anyway): a NaN must
            # be caught before the optimizer writes it into the weights.
            finite = bool(torch.isfinite(step_loss))
            if finite:
                if conf["optim"]["grad_clip"] > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), conf["optim"]["grad_clip"])
                optimizer.step()
            elif tc["on_nan"] == "stop":
                raise NonFiniteLoss(
                    f"non-finite training loss ({float(step_loss) / tc['grad_accum']}) at step "
                    f"{step}; stopped before updating the weights; last good checkpoint: "
                    f"{last_good} (rerun to resume from it, or add train.on_nan=skip)"
                )
            else:
                skipped += 1
            optimizer.zero_grad(set_to_none=True)
            tokens += tokens_per_step
            evals = due_evals(step)
            is_log = step % log_every == 0 or bool(evals) or step == stop_at
            if is_log:
                synchronize(device)  # so the window's time covers its queued device work
            dt = time.perf_counter() - t0
            train_time += dt
            window_time += dt
            window_steps += 1
            if finite:
                window_loss += step_loss
            else:
                window_skipped += 1

            if is_log:
                train_loss = float(step_loss) / tc["grad_accum"]
                row = {"step": step, "train_loss": train_loss}
                if log_every > 1 and window_steps > window_skipped:  # batch-1 loss is noisy
                    row["train_loss_avg"] = (
                        float(window_loss) / tc["grad_accum"] / (window_steps - window_skipped)
                    )
                if tc["on_nan"] == "skip" or skipped:
                    row["skipped_steps"] = skipped
                row.update(run_evals(evals, final=step == steps))
                if evals:
                    barrier(dist_info)  # the other ranks wait while rank 0 evaluates
                row.update(
                    lr=lr,
                    tokens=tokens,
                    tokens_per_s=window_steps * tokens_per_step / max(window_time, 1e-9),
                    elapsed_s=elapsed_prev + time.perf_counter() - t_start,
                )
                last.update({k: v for k, v in row.items() if k in last})
                metrics.write(row)
                logger.log(row, step=step)
                if progress is not None:
                    progress.set_postfix_str(_postfix(row, last), refresh=False)
                if evals:
                    _print_eval(progress, row, steps, window_time / max(window_steps, 1))
                window_loss.zero_()
                window_steps, window_time, window_skipped = 0, 0.0, 0
            if progress is not None:
                progress.update(1)
            # The last step gets final.pt below instead.
            if (step % conf["checkpoint"]["every"] == 0 or step == stop_at) and step < steps:
                save(run.latest_path)
                last_good = f"{run.latest_path} (step {step})"
    finally:
        if progress is not None:
            progress.close()
        metrics.close()

    if step < steps:  # stopped early on purpose (train.stop_at); the checkpoint is written
        logger.finish()
        print(
            f"{run.path}: stopped at step {step} of {steps} (train.stop_at); "
            "rerun without it to continue",
            flush=True,
        )
        return {"finished": False, "steps": step}

    # ---- the end: final checkpoint, then summary.json (which marks the run finished) ------------
    save(run.final_path)
    if main_rank:
        run.latest_path.unlink(missing_ok=True)
    wall = elapsed_prev + time.perf_counter() - t_start
    summary = {
        "finished": True,
        "steps": steps,
        "final_train_loss": last["train_loss"],
        "final_val_loss": last["val_loss"],
        "final_val_loss_fixed": last["val_loss_fixed"],
        "tokens": tokens,
        "wall_s": wall,
        "train_time_s": train_time,
        "tokens_per_s": tokens / max(train_time, 1e-9),
        "ms_per_step": 1e3 * train_time / steps,
        **peak_memory(device),
        "experiment": conf["experiment_name"],
        "method": mc["name"],
        "method_tag": method_tag(mc),
        "rank": mc.get("rank"),
        "seed": conf["seed"],
        "basis_layers": basis_layers,
        "n_params": n_params,
        "device": str(device),
        "threads": threads,
        "torch": torch.__version__,
        "git_commit": git_commit(),
        "config_hash": chash,
        "wandb_id": wandb_id,
        "skipped_steps": skipped,
        "world_size": dist_info.world_size,
        "global_batch_size": tc["batch_size"] * dist_info.world_size * tc["grad_accum"],
    }
    if len(final_fixed) >= 2:
        record = fixed_eval_record(final_fixed, step=steps, block_size=T)
        summary["final_val_loss_fixed_se"] = record["se"]
        if main_rank:
            run.write_fixed_eval({"run": run.path.name, **record})
    if main_rank:
        run.write_summary(summary)
    barrier(dist_info)
    logger.summary(summary)
    logger.finish()
    print(
        f"{run.path}: done | train {_fmt(summary['final_train_loss'])} | val "
        f"{_fmt(summary['final_val_loss'])} | val fixed {_fmt(summary['final_val_loss_fixed'])} | "
        f"{summary['tokens_per_s']:,.0f} tok/s | {summary['ms_per_step']:.2f} ms/step",
        flush=True,
    )
    return summary


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def _postfix(row: dict[str, Any], last: dict[str, Any]) -> str:
    return (
        f"loss {_fmt(row['train_loss'])} val {_fmt(last['val_loss'] or last['val_loss_fixed'])} "
        f"{row['tokens_per_s']:,.0f} tok/s"
    )


def _print_eval(progress: Any, row: dict[str, Any], steps: int, s_per_step: float) -> None:
    line = (
        f"step {row['step']}/{steps} | train {_fmt(row['train_loss'])} | val "
        f"{_fmt(row.get('val_loss'))} | val fixed {_fmt(row.get('val_loss_fixed'))} | "
        f"{row['tokens_per_s']:,.0f} tok/s | {1e3 * s_per_step:.2f} ms/step"
    )
    if progress is not None:
        progress.write(line)
    else:
        print(line, flush=True)


def _progress_bar(setting: str | bool, initial: int, total: int) -> Any:
    if setting is False or (setting == "auto" and not sys.stderr.isatty()):
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, dynamic_ncols=True, mininterval=0.5, unit="step")


# What a user can cause and fix: reported as one line, never as a traceback.
USER_ERRORS = (ConfigError, DataError, CheckpointError, NonFiniteLoss, ValueError, OSError)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    cause = e.__cause__
    if type(e).__module__.startswith("hydra"):
        if "is not in struct" in str(cause):  # Hydra's wording for an unknown key
            key = text.split("'")[1] if text.count("'") >= 2 else "?"
            return f"unknown config key '{key}' (to add a new key use +{key}=...)"
        text = text.split(" Config search path:")[0]  # Hydra appends its search path
        if cause is not None and str(cause).strip():
            text += f" ({' '.join(str(cause).split())})"
    return text if len(text) <= 500 else text[:497] + "..."


def _exit_with(e: BaseException) -> None:
    if os.environ.get("BASIS_TRACEBACK"):
        raise e
    # Under torchrun each rank reports (an error may be one rank's own), naming itself if not 0.
    rank = env_info().rank
    print(f"error: {f'rank {rank}: ' if rank else ''}{_one_line(e)}", file=sys.stderr, flush=True)
    sys.exit(2)


def _multirun_job() -> str | None:
    """``job N`` inside a Hydra multirun (Hydra's next line names its overrides), else None."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    return f"job {HydraConfig.get().job.num}"


@hydra.main(version_base="1.3", config_path="configs", config_name="config")
def main(cfg: DictConfig) -> None:
    # Ranks other than 0 run silently (their stdout would repeat rank 0's).
    quiet = env_info().is_main is False
    try:
        with contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext():
            train(cfg)
    except USER_ERRORS as e:
        job = _multirun_job()
        if job is not None and not os.environ.get("BASIS_TRACEBACK"):
            # sys.exit in a sweep worker would end the whole sweep; a plain exception fails
            # this job only, and Hydra raises it once the other jobs of the batch have run.
            line = f"{job}: {_one_line(e)}"
            print(f"error: {line}", file=sys.stderr, flush=True)
            raise JobFailed(line) from None
        # Raised here, Hydra would print its own report first; SystemExit passes through it.
        _exit_with(e)
    finally:
        cleanup()


def cli() -> None:
    """``main``, with Hydra's own errors (unknown key, bad override) also as one line, exit 2.

    ``BASIS_TRACEBACK=1`` shows tracebacks instead.
    """
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    # Without this Hydra prints a multi-line report and exits 1; with it, its errors reach us.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        main()
    except (HydraException, OmegaConfBaseException, JobFailed, *USER_ERRORS) as e:
        _exit_with(e)
    except KeyboardInterrupt:
        print(
            "interrupted; rerun the same command to resume from the last checkpoint",
            file=sys.stderr,
            flush=True,
        )
        sys.exit(130)


if __name__ == "__main__":
    cli()
