"""Prepare data from the command line, e.g. `python -m data.prepare data=fineweb_edu`.

Usage: python -m data.prepare [data=<name>] [data.<key>=<value> ...]

Arguments are Hydra overrides, composed from the repo's configs/ (configs/config.yaml when it
exists, so defaults match train.py; otherwise the `data` group alone, default shakespeare).
Prints the prepared directory and its token counts; errors are one line on stderr, exit status 1.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from data.errors import DataError
from data.prepared import describe, prepare_data


def _compose(overrides: list[str]) -> Any:
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    configs = Path(__file__).resolve().parent.parent / "configs"
    if not (configs / "data").is_dir():
        configs = Path.cwd() / "configs"
    if not (configs / "data").is_dir():
        raise DataError("cannot find configs/data/; run from the repository root")
    try:
        with initialize_config_dir(config_dir=str(configs), version_base=None):
            if (configs / "config.yaml").is_file():
                return compose(config_name="config", overrides=overrides).data
            # Without a primary config the group must be added, not overridden.
            group = [o for o in overrides if o.startswith("data=")] or ["data=shakespeare"]
            rest = [o for o in overrides if not o.startswith("data=")]
            return compose(overrides=["+" + group[-1], *rest]).data
    except (HydraException, OmegaConfBaseException) as e:
        message = " ".join(str(e).split(" Config search path")[0].split())
        raise DataError(f"bad arguments {' '.join(overrides)!r}: {message}") from e


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in args):
        print(__doc__)
        return 0
    try:
        directory = prepare_data(_compose(args))
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(describe(directory))
    return 0


if __name__ == "__main__":
    sys.exit(main())
