"""The README's bad-input table: each case and the one line ``error: ...`` the user sees.

Cases already covered elsewhere are not repeated here: unknown key without ``+``, unknown
method group, layer pattern that matches nothing and missing data through the CLI
(test_train.py::test_cli_errors_are_one_line_with_exit_status_2); rank 0 / not an integer and
λ above 1 (test_train.py::test_config_errors_name_the_key); a non-checkpoint file and a
checkpoint with another config hash (test_train.py::test_checkpoint_from_elsewhere_is_refused);
W&B online without credentials (test_train_units.py::test_wandb_online_falls_back_to_offline_fast).
In-process here: the line is ``"error: " + train._one_line(e)``, exactly what ``cli`` prints.
"""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers_train import REPO, compose_config, make_corpus, smoke_overrides

import train

FAST = ["train.steps=8", "eval.every=8", "checkpoint.every=4", "eval.at_start=false"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def stopped(tmp_path_factory: pytest.TempPathFactory, corpus: Path) -> Path:
    """A run directory stopped at step 4 with checkpoints/latest.pt."""
    root = tmp_path_factory.mktemp("stopped")
    train.train(compose_config(smoke_overrides(root, corpus, *FAST, "train.stop_at=4")))
    return root / "run"


def user_line(tmp_path: Path, corpus: Path, *extra: str, run_dir: Path | None = None) -> str:
    """The one line the CLI would print for this run."""
    overrides = smoke_overrides(tmp_path, corpus, *FAST, *extra)
    if run_dir is not None:
        overrides.append(f"run_dir={run_dir}")
    try:
        train.train(compose_config(overrides))
    except Exception as e:  # noqa: BLE001 - any escape is a failure below
        assert isinstance(e, train.USER_ERRORS), repr(e)
        return f"error: {train._one_line(e)}"
    raise AssertionError("no error")


@pytest.mark.parametrize(
    ("overrides", "line"),
    [
        (["method=basis", "method.rank=-3"], "error: method.rank must be an integer >= 1, got -3"),
        (
            ["method=basis", "method.rank=2.5"],
            "error: method.rank must be an integer >= 1, got 2.5",
        ),
        (
            ["method=basis", "method.lam=-0.1"],
            "error: method.lam must be a number in [0, 1), got -0.1",
        ),
        (["method.name=foo"], "error: method.name must be one of exact, basis, got 'foo'"),
        (["model.vocab_size=1000"], "error: data.vocab_size=50257 exceeds model.vocab_size=1000"),
        (["train.block_size=33"], "error: train.block_size=33 exceeds model.block_size=32"),
        (["train.on_nan=ignore"], "error: train.on_nan must be one of stop, skip, got 'ignore'"),
    ],
)
def test_config_values(overrides: list[str], line: str, tmp_path: Path) -> None:
    assert user_line(tmp_path, tmp_path, *overrides) == line


def test_truncated_token_file(tmp_path: Path, corpus: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(corpus, data)
    with open(data / "train.bin", "r+b") as f:
        f.truncate(1001)
    line = user_line(tmp_path, data, f"data.dir={data}")
    assert line.startswith(f"error: {data / 'train.bin'} has 1001 bytes, not a whole number")
    with open(data / "train.bin", "r+b") as f:
        f.truncate(1000)
    line = user_line(tmp_path, data, f"data.dir={data}")
    assert "holds 500 tokens but meta.json says 40000" in line
    (data / "train.bin").unlink()
    line = user_line(tmp_path, data, f"data.dir={data}")
    assert line.startswith(f"error: {data / 'train.bin'} is missing;"), line


def test_token_ids_beyond_the_vocabulary(tmp_path: Path, corpus: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(corpus, data)
    tokens = np.memmap(data / "train.bin", dtype=np.uint16, mode="r+")
    tokens[123] = 60000  # same size, so only the id scan can tell
    tokens.flush()
    del tokens
    line = user_line(tmp_path, data, f"data.dir={data}")
    assert line == (
        f"error: {data / 'train.bin'} holds token id 60000 >= vocabulary size 50257; "
        f"the file is damaged: delete {data} and prepare again"
    )


def test_resume_with_another_model_or_experiment(
    tmp_path: Path, corpus: Path, stopped: Path
) -> None:
    run_dir = tmp_path / "copy"
    shutil.copytree(stopped, run_dir)
    line = user_line(tmp_path, corpus, "model.n_layer=1", run_dir=run_dir)
    assert line.startswith(
        f"error: run_dir {run_dir} holds a run with a different config (model.n_layer: 2 -> 1)"
    )
    line = user_line(tmp_path, corpus, "experiment_name=other", run_dir=run_dir)
    assert "different config (experiment_name: 'smoke' -> 'other')" in line
    # a checkpoint carried into the run directory of another model config
    other = tmp_path / "other"
    user_line_ok = smoke_overrides(tmp_path, corpus, *FAST, "model.n_layer=1", "train.stop_at=4")
    train.train(compose_config([*user_line_ok, f"run_dir={other}"]))
    shutil.copy(stopped / "checkpoints" / "latest.pt", other / "checkpoints" / "latest.pt")
    line = user_line(tmp_path, corpus, "model.n_layer=1", run_dir=other)
    assert line.startswith(
        f"error: {other / 'checkpoints' / 'latest.pt'} was written by a different"
    )


class _Exploit:
    def __reduce__(self):  # noqa: ANN204 - pickle protocol
        return (os.system, ("touch PWNED",))


def test_tampered_checkpoint_runs_no_code(tmp_path: Path, corpus: Path, stopped: Path) -> None:
    run_dir = tmp_path / "copy"
    shutil.copytree(stopped, run_dir)
    latest = run_dir / "checkpoints" / "latest.pt"
    latest.write_bytes(pickle.dumps({"format": "basis-train-checkpoint/1", "x": _Exploit()}))
    os.chdir(tmp_path)
    line = user_line(tmp_path, corpus, run_dir=run_dir)
    assert line == (
        f"error: cannot load checkpoint {latest}: refused by torch.load(weights_only=True) "
        "(Unsupported operand 149); it is not a checkpoint written by train.py, or it was altered"
    )
    assert not (tmp_path / "PWNED").exists()
    latest.write_bytes(b"")  # zero bytes: e.g. a copy that ran out of disk
    assert user_line(tmp_path, corpus, run_dir=run_dir) == (
        f"error: cannot load checkpoint {latest}: the file is empty or truncated"
    )


def test_a_failing_multirun_job_fails_only_itself(tmp_path: Path, corpus: Path) -> None:
    """joblib workers: job 0 has a bad value, job 1 must still run to the end."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("BASIS_TRACEBACK", None)
    args = [a for a in smoke_overrides(tmp_path, corpus, *FAST) if not a.startswith("run_dir=")]
    cmd = [sys.executable, str(REPO / "train.py"), "-m", *args, "hydra/launcher=local"]
    cmd += ["method=basis", "method.rank=0,2", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors[0] == ("error: job 0: method.rank must be an integer >= 1, got 0"), proc.stderr
    assert "Traceback" not in proc.stderr
    assert errors[-1] == errors[0]  # and once more at the end, as the sweep's exit reason
    summary = tmp_path / "runs" / "smoke" / "basis-r2-s0" / "summary.json"
    assert summary.is_file(), proc.stderr  # the other job finished
