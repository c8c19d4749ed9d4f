"""BASIS: exact dX, count-sketched dW for linear layers (arXiv 2604.16324)."""

from .functional import basis_linear, check_settings
from .gemm import Linear, fast_linear
from .layer import BasisLinear, apply_basis, layer_seed, mix_seed, seed_sketches
from .sketch import HASHINGS, Sketch, draw_sketch, invariant_scalar

__all__ = [
    "HASHINGS",
    "BasisLinear",
    "Linear",
    "Sketch",
    "apply_basis",
    "basis_linear",
    "check_settings",
    "draw_sketch",
    "fast_linear",
    "invariant_scalar",
    "layer_seed",
    "mix_seed",
    "seed_sketches",
]
