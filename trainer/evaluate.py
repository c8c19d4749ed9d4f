"""Validation loss: the model in eval mode under no_grad, where BASIS layers are exact."""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import AbstractContextManager

import torch
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
