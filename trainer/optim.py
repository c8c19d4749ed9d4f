"""Optimizer construction and the learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn


def _impl_kwargs(impl: str, device_type: str) -> dict[str, bool]:
    if impl == "auto":
        # One fused kernel per step instead of a few passes over every parameter: at the paper's
        # size the update of ~6.5M parameters is memory-bound and this is a large share of a step.
        impl = "fused" if device_type in ("cpu", "cuda") else "foreach"
    return {"fused": {"fused": True}, "foreach": {"foreach": True}, "loop": {"foreach": False}}[
        impl
    ]


def build_optimizer(
    model: nn.Module, cfg: Mapping[str, Any], device_type: str
) -> torch.optim.Optimizer:
    kwargs = _impl_kwargs(cfg["impl"], device_type)
    if cfg["name"] == "sgd":
        # One group for all parameters: the paper's SGD has no weight decay to exempt anything from.
        return torch.optim.SGD(
            model.parameters(),
            lr=cfg["lr"],
            momentum=cfg["momentum"],
            nesterov=cfg["nesterov"],
            weight_decay=cfg["weight_decay"],
            **kwargs,
        )
    if cfg["name"] == "adamw":
        # nanoGPT: decay matrices and embeddings, not biases and LayerNorm gains.
        params = [p for p in model.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg["weight_decay"]},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(
            groups, lr=cfg["lr"], betas=tuple(cfg["betas"]), eps=cfg["eps"], **kwargs
        )
    raise ValueError(f"unknown optimizer {cfg['name']!r}")


def lr_at(step: int, cfg: Mapping[str, Any], total_steps: int) -> float:
    """Learning rate for optimizer step ``step`` (1-based) of ``total_steps``."""
    lr = float(cfg["lr"])
    warmup = int(cfg["warmup_steps"])
    if warmup and step <= warmup:
        return lr * step / warmup
    if cfg["schedule"] == "constant":
        return lr
    min_lr = float(cfg["min_lr"])
    progress = (step - warmup) / max(1, total_steps - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))) * (lr - min_lr)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
