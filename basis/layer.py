"""``BasisLinear``, a drop-in ``nn.Linear``, and ``apply_basis`` to swap layers in a model by name."""

from __future__ import annotations

import fnmatch
import zlib
from collections.abc import Iterable

import torch
from torch import nn

from .functional import basis_linear, check_settings, sketched_linear
from .gemm import Linear, fast_linear
from .rng import mix_seed


def layer_seed(seed: int, name: str) -> int:
    """The sketch seed of the layer called ``name`` in a run seeded with ``seed``."""
    return mix_seed(seed, zlib.crc32(name.encode()))


class BasisLinear(Linear):
    """``nn.Linear`` whose weight gradient is estimated by BASIS in training mode.

    Same parameters (``weight``, ``bias``) and attributes as ``nn.Linear``; in eval mode or without
    autograd it is the exact linear map (``basis.gemm.Linear``). Call ``i`` of this layer draws its sketch from
    ``mix_seed(seed, i)``: the counter lives in the state dict, so a model restored from a
    checkpoint continues the very sketch stream an uninterrupted run would have drawn, and the
    global torch RNG is never touched (exact and BASIS runs stay paired).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        rank: int,
        lam: float = 0.0,
        scale: float = 1.0,
        eps: float = 1e-8,
        invariant_scalars: bool = True,
        hashing: str = "balanced",
        seed: int = 0,
    ) -> None:
        check_settings(rank, lam, scale, eps, invariant_scalars, hashing)
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.rank, self.lam, self.scale, self.eps = rank, lam, scale, eps
        self.invariant_scalars, self.hashing = invariant_scalars, hashing
        self.seed = seed
        self.calls = 0

    @classmethod
    def from_linear(cls, linear: nn.Linear, **settings) -> BasisLinear:
        """A ``BasisLinear`` sharing ``linear``'s parameter tensors (weight tying survives)."""
        layer = cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            device="meta",
            **settings,
        )
        layer.weight = linear.weight
        layer.bias = linear.bias
        layer.train(linear.training)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and torch.is_grad_enabled()):
            return fast_linear(x, self.weight, self.bias)
        if (
            torch.compiler.is_compiling()
            or not self.weight.requires_grad
            or x.numel() == 0
            or x.dim() == 0
            or x.shape[-1] != self.in_features
        ):
            return self._checked(x)
        # The common case without basis_linear's per-call checks: a few µs a call, which at the
        # paper's size is a visible share of a step (the settings are checked here instead).
        check_settings(
            self.rank, self.lam, self.scale, self.eps, self.invariant_scalars, self.hashing
        )
        seed = mix_seed(self.seed, self.calls)
        self.__dict__["calls"] += 1  # what `self.calls += 1` does, without nn.Module.__setattr__
        return sketched_linear(
            x, self.weight, self.bias, self.rank, float(self.lam), float(self.scale),
            float(self.eps), self.invariant_scalars, self.hashing, seed,
        )  # fmt: skip

    @torch.compiler.disable  # the per-call seed counter is host-side state
    def _checked(self, x: torch.Tensor) -> torch.Tensor:
        seed = mix_seed(self.seed, self.calls)
        self.calls += 1
        return basis_linear(
            x,
            self.weight,
            self.bias,
            rank=self.rank,
            lam=self.lam,
            scale=self.scale,
            eps=self.eps,
            invariant_scalars=self.invariant_scalars,
            hashing=self.hashing,
            seed=seed,
        )

    def get_extra_state(self) -> dict[str, int]:
        return {"seed": self.seed, "calls": self.calls}

    def set_extra_state(self, state: dict[str, int]) -> None:
        self.seed, self.calls = int(state["seed"]), int(state["calls"])

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, rank={self.rank}, lam={self.lam}, scale={self.scale}, "
            f"hashing={self.hashing}, invariant_scalars={self.invariant_scalars}"
        )


def is_plain_linear(module: nn.Module) -> bool:
    """Whether ``apply_basis`` may swap ``module``: a linear layer whose own forward is called."""
    # Exact types only: nn.Linear subclasses such as MultiheadAttention's out_proj are called
    # through their weight by the parent, so swapping them would silently change nothing.
    return type(module) in (nn.Linear, Linear, BasisLinear)


def apply_basis(
    model: nn.Module,
    patterns: str | Iterable[str],
    *,
    rank: int,
    lam: float = 0.0,
    scale: float = 1.0,
    eps: float = 1e-8,
    invariant_scalars: bool = True,
    hashing: str = "balanced",
    seed: int = 0,
) -> list[str]:
    """Replace the ``nn.Linear`` modules whose qualified names match a glob in ``patterns``.

    Weights are kept (the same parameter tensors). Returns the replaced names in model order.
    Raises ``ValueError`` if a pattern matches no linear layer.
    """
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    if not patterns:
        raise ValueError("patterns is empty: name at least one layer glob, e.g. 'lm_head'")
    check_settings(rank, lam, scale, eps, invariant_scalars, hashing)
    linears = [name for name, m in model.named_modules() if name and is_plain_linear(m)]
    unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in linears)]
    if unmatched:
        shown = ", ".join(linears[:6]) + (", ..." if len(linears) > 6 else "")
        raise ValueError(
            f"layer pattern {unmatched[0]!r} matches no nn.Linear in the model (linear layers: {shown})"
        )
    replaced = [n for n in linears if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    for name in replaced:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        new = BasisLinear.from_linear(
            getattr(parent, child),
            rank=rank,
            lam=lam,
            scale=scale,
            eps=eps,
            invariant_scalars=invariant_scalars,
            hashing=hashing,
            seed=layer_seed(seed, name),
        )
        setattr(parent, child, new)
    return replaced


def seed_sketches(model: nn.Module, seed: int) -> None:
    """Re-seed every ``BasisLinear`` in ``model`` from ``seed`` and its name (e.g. per DDP rank).

    Call counters are kept, so re-seeding after loading a checkpoint does not rewind the stream.
    """
    for name, module in model.named_modules():
        if isinstance(module, BasisLinear):
            module.seed = layer_seed(seed, name)
