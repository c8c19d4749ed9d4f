"""The pieces of ``train.py`` that are worth testing on their own, one concern per module.

config       validation of the composed Hydra config, run identity (hash and diff)
run_dir      where a run lives and what state it is in (fresh, resumable, finished)
atomic       files replaced in one step (temp file, fsync, rename)
checkpoint   atomic save / weights_only load, RNG capture and restore
metrics      metrics.jsonl, truncated on resume so no step appears twice
optim        optimizer construction and the learning-rate schedule
evaluate     validation loss under no_grad in eval mode (also per chunk)
stats        means and standard errors (plain Python), the fixed_eval.json record
runtime      device, threads, autocast, peak memory
wandb_logger Weights & Biases (offline by default, never hangs) or nothing

Nothing here imports ``train.py`` or ``scripts/``; modules import torch, omegaconf and the
project packages only, and wandb lazily.
"""
