"""metrics.jsonl: one JSON object per logged step, append-only while a run is alive.

On resume from a checkpoint at step k the file is cut back to the rows with step <= k (rows
written after the last checkpoint are recomputed identically), so no step ever appears twice.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from trainer.atomic import atomic_write_text


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All complete rows; a torn last line (killed mid-write) is skipped."""
    rows = []
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        return rows
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
    return rows


def _clean(value: Any) -> Any:
    # JSON has no NaN/inf; null keeps the file parseable by any reader.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsLog:
    def __init__(self, path: Path, *, keep_until_step: int) -> None:
        self.path = Path(path)
        kept = [r for r in read_metrics(self.path) if r["step"] <= keep_until_step]
        if self.path.exists() or kept:
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self._file = open(self.path, "a")  # noqa: SIM115 - held open for the run's lifetime

    def write(self, row: dict[str, Any]) -> None:
        self._file.write(json.dumps({k: _clean(v) for k, v in row.items()}) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()
