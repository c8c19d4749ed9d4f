"""Helpers shared by the scripts in this folder (run as files, so they put the repo on sys.path).

Each script reports bad input as one line on stderr and exits 2, like argparse does, so shell
loops and CI see a usage error rather than a traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NoReturn

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from trainer.stats import mean_se, mean_std  # noqa: E402, F401  (the scripts' statistics)

# The layers BASIS sketches in the paper (spec §2): the MLP's FC and Proj and the output head.
PAPER_LAYERS: tuple[str, ...] = (
    "transformer.h.*.mlp.c_fc",
    "transformer.h.*.mlp.c_proj",
    "lm_head",
)
ALL_LINEAR: tuple[str, ...] = ("*",)  # apply_basis only matches nn.Linear, so "*" = every linear

MODEL_CONFIG_DIR = REPO / "configs" / "model"


def available_models() -> list[str]:
    return sorted(p.stem for p in MODEL_CONFIG_DIR.glob("*.yaml"))


def load_model_config(name: str) -> dict:
    """The GPTConfig keywords of ``configs/model/<name>.yaml``, the presets train.py uses."""
    return load_config("model", name)


def load_config(group: str, name: str) -> dict:
    """``configs/<group>/<name>.yaml`` as a dict: the presets train.py uses, in one place."""
    from omegaconf import OmegaConf

    path = REPO / "configs" / group / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in path.parent.glob("*.yaml")))
        raise UsageError(f"unknown {group} {name!r}; choose from {known}")
    return dict(OmegaConf.to_container(OmegaConf.load(path), resolve=True))


class UsageError(Exception):
    """Bad input a user can fix; ``main`` turns it into one line on stderr and exit code 2."""


def fail(prog: str, message: str) -> NoReturn:
    print(f"{prog}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def parse_int_list(text: str, what: str, minimum: int = 1) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{what} must be comma-separated integers, got {text!r}") from None
    if not values or any(v < minimum for v in values):
        raise UsageError(f"{what} must be integers >= {minimum}, got {text!r}")
    return values


def fmt_bytes(n: float) -> str:
    """Binary units with three significant digits: 1.00 KiB = 1024 B."""
    if n < 1024:
        return f"{int(n)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024.0
        if n < 1024 or unit == "TiB":
            return f"{n:.3g} {unit}" if n < 100 else f"{n:.0f} {unit}"
    raise AssertionError("unreachable")


def md_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
