"""Validation loss: the model in eval mode under no_grad, where BASIS layers are exact."""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import AbstractContextManager

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    device: torch.device,
    autocast: AbstractContextManager,
) -> float:
    """Mean over chunks of the chunk's mean token loss (all chunks have the same size)."""
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    try:
        for x, y in batches:
            with autocast:
                _, loss = model(x.to(device), y.to(device))
            total += float(loss)
            n += 1
    finally:
        model.train(was_training)
    if n == 0:
        raise ValueError("evaluation got no batches")
    return total / n


@torch.no_grad()
def chunk_losses(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    device: torch.device,
    autocast: AbstractContextManager,
) -> list[float]:
    """Each evaluated sequence's mean token loss, in order (a loader chunk of batch size b gives
    b of them; at the paper's batch 1, one per chunk): what standard errors and paired
    differences need."""
    was_training = model.training
    model.eval()
    out: list[float] = []
    try:
        for x, y in batches:
            with autocast:
                logits, _ = model(x.to(device), y.to(device))
            per_token = F.cross_entropy(
                logits.float().reshape(-1, logits.size(-1)),
                y.to(device).reshape(-1),
                reduction="none",
            )
            out.extend(per_token.view(y.shape).mean(dim=-1).tolist())
    finally:
        model.train(was_training)
    return out
