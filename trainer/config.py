"""Validate the composed config before anything runs, and define what makes two runs "the same".

Hydra already rejects overrides of keys that do not exist; this adds the checks Hydra cannot do
(types, ranges, cross-field rules, keys added with ``+``) and turns each failure into one line.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from collections.abc import Callable, Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from model import GPTConfig


class ConfigError(ValueError):
    """A one-line, user-facing configuration problem."""


Check = Callable[[str, Any], None]


def _fail(key: str, what: str, value: Any) -> None:
    raise ConfigError(f"{key} must be {what}, got {value!r}")


def _int(lo: int | None = None, hi: int | None = None, optional: bool = False) -> Check:
    def check(key: str, v: Any) -> None:
        if v is None and optional:
            return
        ok = isinstance(v, int) and not isinstance(v, bool)
        if not ok or (lo is not None and v < lo) or (hi is not None and v > hi):
            rng = f" >= {lo}" if hi is None and lo is not None else ""
            if lo is not None and hi is not None:
                rng = f" in [{lo}, {hi}]"
            _fail(key, ("null or " if optional else "") + f"an integer{rng}", v)

    return check


def _float(
    lo: float | None = None,
    hi: float | None = None,
    *,
    lo_open: bool = False,
    hi_open: bool = False,
) -> Check:
    def check(key: str, v: Any) -> None:
        ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
        if ok and lo is not None:
            ok = v > lo if lo_open else v >= lo
        if ok and hi is not None:
            ok = v < hi if hi_open else v <= hi
        if not ok:
            if lo is not None and hi is not None:
                what = (
                    f"a number in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
                )
            elif lo is not None:
                what = f"a number {'>' if lo_open else '>='} {lo:g}"
            else:
                what = "a finite number"
            _fail(key, what, v)

    return check


def _bool(key: str, v: Any) -> None:
    if not isinstance(v, bool):
        _fail(key, "true or false", v)


def _choice(*options: Any) -> Check:
    def check(key: str, v: Any) -> None:
        # type-exact, so that `true` does not pass for 1 or "auto" for a typo'd string
        if not any(type(v) is type(o) and v == o for o in options):
            shown = ", ".join(str(o).lower() if isinstance(o, bool) else str(o) for o in options)
            _fail(key, f"one of {shown}", v)

    return check


def _str(optional: bool = False) -> Check:
    def check(key: str, v: Any) -> None:
        if v is None and optional:
            return
        if not isinstance(v, str) or not v:
            _fail(key, ("null or " if optional else "") + "a non-empty string", v)

    return check


def _str_list(nonempty: bool) -> Check:
    def check(key: str, v: Any) -> None:
        if not isinstance(v, list) or not all(isinstance(s, str) and s for s in v):
            _fail(key, "a list of strings", v)
        if nonempty and not v:
            _fail(key, "a non-empty list", v)

    return check


def _device(key: str, v: Any) -> None:
    ok = isinstance(v, str) and (
        v in ("auto", "cpu", "cuda", "mps") or (v.startswith("cuda:") and v[5:].isdigit())
    )
    if not ok:
        _fail(key, "auto, cpu, cuda, cuda:N or mps", v)


def _protocols(key: str, v: Any) -> None:
    if (
        not isinstance(v, list)
        or any(p not in ("paper", "fixed") for p in v)
        or len(set(v)) != len(v)
    ):
        _fail(key, "a list drawn from [paper, fixed] without repeats", v)


def _betas(key: str, v: Any) -> None:
    ok = (
        isinstance(v, list)
        and len(v) == 2
        and all(
            isinstance(b, int | float) and not isinstance(b, bool) and 0.0 <= b < 1.0 for b in v
        )
    )
    if not ok:
        _fail(key, "a pair of numbers in [0, 1)", v)


SECTION = object()  # marks a nested section in the schemas below

TOP: dict[str, Any] = {
    "experiment_name": _str(),
    "seed": _int(0),
    "device": _device,
    "dtype": _choice("fp32", "bf16"),
    "compile": _bool,
    "threads": _int(1, optional=True),
    "run_dir": _str(optional=True),
    "resume": _choice("auto", "never"),
    "progress": _choice("auto", True, False),
    "train": SECTION,
    "eval": SECTION,
    "checkpoint": SECTION,
    "model": SECTION,
    "method": SECTION,
    "optim": SECTION,
    "logger": SECTION,
    "data": SECTION,
}
TRAIN = {
    "steps": _int(1),
    "batch_size": _int(1),
    "block_size": _int(1),
    "grad_accum": _int(1),
    "order": _choice("sequential", "random"),
    "log_every": _int(1),
    "stop_at": _int(1, optional=True),
    "on_nan": _choice("stop", "skip"),
}
EVAL = {
    "every": _int(1),
    "at_start": _bool,
    "protocols": _protocols,
    "chunks": _int(1),
    "batch_size": _int(1),
    "fixed_chunks": _int(1, optional=True),
    "fixed_batch_size": _int(1),
    "fixed_every": _int(1),
}
CHECKPOINT = {"every": _int(1)}
METHODS: dict[str, dict[str, Check]] = {
    "exact": {"name": _str()},
    "basis": {
        "name": _str(),
        "rank": _int(1),
        "lam": _float(0.0, 1.0, hi_open=True),
        "scale": _float(),
        "eps": _float(0.0, lo_open=True),
        "hashing": _choice("balanced", "uniform", "gaussian"),
        "invariant_scalars": _bool,
        "layers": _str_list(nonempty=True),
    },
}
_SCHEDULE = {
    "schedule": _choice("constant", "cosine"),
    "warmup_steps": _int(0),
    "min_lr": _float(0.0),
    "grad_clip": _float(0.0),
    "impl": _choice("auto", "fused", "foreach", "loop"),
}
OPTIMS: dict[str, dict[str, Check]] = {
    "sgd": {
        "name": _str(),
        "lr": _float(0.0, lo_open=True),
        "momentum": _float(0.0, 1.0, hi_open=True),
        "nesterov": _bool,
        "weight_decay": _float(0.0),
        **_SCHEDULE,
    },
    "adamw": {
        "name": _str(),
        "lr": _float(0.0, lo_open=True),
        "betas": _betas,
        "eps": _float(0.0, lo_open=True),
        "weight_decay": _float(0.0),
        **_SCHEDULE,
    },
}
LOGGERS: dict[str, dict[str, Check]] = {
    "none": {"name": _str()},
    "wandb": {
        "name": _str(),
        "mode": _choice("offline", "online", "disabled"),
        "project": _str(),
        "entity": _str(optional=True),
        "group": _str(optional=True),
        "tags": _str_list(nonempty=False),
    },
}


def _check_section(values: Any, schema: Mapping[str, Any], prefix: str) -> None:
    if not isinstance(values, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or 'the config'} must be a mapping, got {values!r}")
    unknown = sorted(set(values) - set(schema))
    if unknown:
        raise ConfigError(
            f"unknown config key '{prefix}{unknown[0]}' (known here: {', '.join(schema)})"
        )
    missing = sorted(set(schema) - set(values))
    if missing:
        raise ConfigError(f"missing config key '{prefix}{missing[0]}'")
    for key, check in schema.items():
        if check is not SECTION:
            check(prefix + key, values[key])


def _variant(section: Mapping[str, Any], table: Mapping[str, Any], group: str) -> Mapping:
    name = section.get("name") if isinstance(section, Mapping) else None
    if name not in table:
        raise ConfigError(f"{group}.name must be one of {', '.join(table)}, got {name!r}")
    return table[name]


def to_container(cfg: DictConfig | Mapping[str, Any]) -> dict[str, Any]:
    """The config as plain, fully resolved Python data (one-line error on a bad interpolation)."""
    if isinstance(cfg, DictConfig):
        try:
            out = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
        except OmegaConfBaseException as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"cannot resolve the config: {first}") from e
        assert isinstance(out, dict)
        return out
    return json.loads(json.dumps(cfg))


def validate(cfg: DictConfig | Mapping[str, Any]) -> dict[str, Any]:
    """Check every key we own; return the resolved config as a plain dict.

    The ``data`` section belongs to the data package, which validates it when it is used.
    """
    conf = to_container(cfg)
    _check_section(conf, TOP, "")
    _check_section(conf["train"], TRAIN, "train.")
    _check_section(conf["eval"], EVAL, "eval.")
    _check_section(conf["checkpoint"], CHECKPOINT, "checkpoint.")
    _check_section(conf["method"], _variant(conf["method"], METHODS, "method"), "method.")
    _check_section(conf["optim"], _variant(conf["optim"], OPTIMS, "optim"), "optim.")
    _check_section(conf["logger"], _variant(conf["logger"], LOGGERS, "logger"), "logger.")
    if not isinstance(conf["model"], Mapping):
        raise ConfigError("model must be a mapping")
    try:
        model = GPTConfig.from_dict(conf["model"])
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e)) from e

    train = conf["train"]
    if train["block_size"] > model.block_size:
        raise ConfigError(
            f"train.block_size={train['block_size']} exceeds model.block_size={model.block_size}"
        )
    if train["stop_at"] is not None and train["stop_at"] > train["steps"]:
        raise ConfigError(
            f"train.stop_at={train['stop_at']} is beyond train.steps={train['steps']}"
        )
    optim = conf["optim"]
    if optim["name"] == "sgd" and optim["nesterov"] and optim["momentum"] == 0:
        raise ConfigError("optim.nesterov needs optim.momentum > 0")
    if optim["schedule"] == "cosine" and optim["warmup_steps"] >= train["steps"]:
        raise ConfigError(
            f"optim.warmup_steps={optim['warmup_steps']} must be below train.steps={train['steps']}"
        )
    if conf["dtype"] == "bf16" and conf["device"] in ("cpu", "mps"):
        raise ConfigError(
            f"dtype=bf16 (autocast) is supported on CUDA only, not device={conf['device']}"
        )
    return conf


# Keys that say how or where a run executes, not what it computes: changing them between a run
# and its resume is allowed (e.g. more threads, another data mount point, W&B on or off).
NOT_IDENTITY = (
    "run_dir",
    "resume",
    "progress",
    "threads",
    "device",
    "compile",
    "logger",
    "train.stop_at",
    "train.on_nan",  # so a run stopped by a NaN can resume with on_nan=skip
    "data.dir",
    "data.verify",
    "data.num_proc",
    "data.local_files",
)


def identity(conf: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a resolved config that determines the run's numbers."""
    out = json.loads(json.dumps(conf))
    for dotted in NOT_IDENTITY:
        *parents, leaf = dotted.split(".")
        node = out
        for p in parents:
            node = node.get(p, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(leaf, None)
    return out


# Identity keys added after runs were already made, each with the value that reproduces what the
# older code did. A saved config.yaml without the key gets that value before comparing, so an
# older run directory still resumes (or is skipped when finished) under newer code. Add an entry
# here whenever a new key would otherwise change the identity of existing runs.
ADDED_KEYS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "eval.fixed_every": lambda conf: conf["eval"]["every"],
}


def upgrade(saved: Mapping[str, Any]) -> dict[str, Any]:
    """``saved`` with every missing key of ``ADDED_KEYS`` filled in with its legacy value."""
    out = json.loads(json.dumps(saved))
    for dotted, legacy in ADDED_KEYS.items():
        *parents, leaf = dotted.split(".")
        node = out
        for p in parents:
            node = node.get(p) if isinstance(node, dict) else None
        if isinstance(node, dict) and leaf not in node:
            # too old to say: the key stays absent and the comparison reports it
            with contextlib.suppress(KeyError, TypeError):
                node[leaf] = legacy(out)
    return out


def config_hash(conf: Mapping[str, Any]) -> str:
    blob = json.dumps(identity(conf), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix.rstrip("."): d}
    flat: dict[str, Any] = {}
    for k, v in d.items():
        flat.update(_flatten(v, f"{prefix}{k}."))
    return flat


def identity_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """``key: old -> new`` for each identity key that differs (``<absent>`` when missing).

    ``old`` is a saved config: keys added since it was written take their legacy values."""
    a, b = _flatten(identity(upgrade(old))), _flatten(identity(new))
    missing = "<absent>"
    return [
        f"{k}: {a.get(k, missing)!r} -> {b.get(k, missing)!r}"
        for k in sorted(set(a) | set(b))
        if a.get(k, missing) != b.get(k, missing)
    ]
