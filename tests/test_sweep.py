"""Sweeps: the paper_sweep presets compose into the report's rows; multiruns with joblib and
submitit_local; an interrupted sweep resumes unfinished jobs and skips finished ones."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from helpers_train import CONFIGS, make_corpus, run_cli
from hydra import compose, initialize_config_dir

from trainer.config import validate
from trainer.run_dir import run_name

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))

import report  # noqa: E402

TINY_RUN = ["train.steps=20", "eval.every=10", "checkpoint.every=10", "logger=none", "threads=1"]
METHODS = "method=exact,basis_r8,basis_r1"


def _compose(overrides: list[str], hydra: bool = False):
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIGS)):
        return compose(config_name="config", overrides=overrides, return_hydra_config=hydra)


def _sweep_params(preset: str) -> dict[str, list[str]]:
    params = _compose([f"experiment={preset}"], hydra=True).hydra.sweeper.params
    return {k: str(v).split(",") for k, v in params.items()}


@pytest.mark.parametrize(
    "preset, rows",
    [("paper_sweep", report.MAIN_ROWS), ("paper_ablations", tuple(report.ABLATIONS))],
)
def test_presets_launch_one_job_per_row_and_seed(preset, rows):
    params = _sweep_params(preset)
    assert params["seed"] == ["1", "2", "3"]
    names, groups = set(), set()
    for method in params["method"]:
        overrides = [f"experiment={preset}", f"method={method}", "seed=2"]
        assert _compose(overrides, hydra=True).hydra.launcher.n_jobs == 2  # 2 jobs ...
        conf = validate(_compose(overrides))  # ... x 1 thread, and the paper's protocol
        assert conf["threads"] == 1 and conf["progress"] is False
        assert conf["train"]["steps"] == 50000 and conf["train"]["batch_size"] == 1
        assert conf["experiment_name"] == "paper-shakespeare"
        names.add(run_name(conf))
        groups.add(conf["logger"]["group"])
    # Every job its own run directory and W&B name; the report has a row for each; one group.
    assert names == {f"{tag}-s2" for tag in rows}
    assert groups == {"paper-shakespeare"}


def test_exact_has_no_rank_and_ablations_change_one_setting():
    exact = validate(_compose(["experiment=paper_sweep", "method=exact"]))["method"]
    assert exact == {"name": "exact"}
    base = validate(_compose(["experiment=paper_sweep", "method=basis_r8"]))["method"]
    for method, diff in [
        ("basis_r8_noinv", {"invariant_scalars": False}),
        ("basis_r8_gaussian", {"hashing": "gaussian"}),
    ]:
        conf = validate(_compose(["experiment=paper_ablations", f"method={method}"]))["method"]
        assert conf == {**base, **diff}


@pytest.mark.parametrize(
    "launcher, target",
    [
        ("local", "JoblibLauncher"),
        ("local_submitit", "LocalLauncher"),
        ("slurm", "SlurmLauncher"),
    ],
)
def test_launcher_configs_compose(launcher, target):
    cfg = _compose(["experiment=paper_sweep", f"hydra/launcher={launcher}"], hydra=True)
    assert cfg.hydra.launcher._target_.endswith(target)
    if launcher != "local":
        assert cfg.hydra.launcher.cpus_per_task == 1 and cfg.hydra.launcher.timeout_min >= 600


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("data"))


def _summaries(cwd: Path) -> dict[str, dict]:
    return {
        p.parent.name: json.loads(p.read_text())
        for p in sorted((cwd / "runs" / "smoke").glob("*/summary.json"))
    }


@pytest.mark.slow
def test_joblib_multirun_resumes_unfinished_and_skips_finished(tmp_path, corpus):
    common = ["experiment=smoke", f"data.dir={corpus}", *TINY_RUN]
    # An "interrupted sweep": one job stopped half-way (train.stop_at), the others not started.
    first = run_cli([*common, "method=basis_r8", "train.stop_at=10"], cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert _summaries(tmp_path) == {}

    sweep = ["-m", *common, METHODS, "hydra/launcher=local", f"hydra.sweep.dir={tmp_path}/mr"]
    proc = run_cli(sweep, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "runs/smoke/basis-r8-s0: resuming from step 10" in proc.stdout
    summaries = _summaries(tmp_path)
    assert set(summaries) == {"exact-s0", "basis-r8-s0", "basis-r1-s0"}
    assert all(s["finished"] and s["steps"] == 20 and s["threads"] == 1 for s in summaries.values())
    steps = [
        json.loads(line)["step"]
        for line in (tmp_path / "runs/smoke/basis-r8-s0/metrics.jsonl").read_text().splitlines()
    ]
    assert steps == list(range(21))  # smoke evaluates at step 0; no step twice after the resume

    again = run_cli(sweep, cwd=tmp_path, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.count("already finished") == 3
    assert _summaries(tmp_path) == summaries

    out = tmp_path / "report"
    assert report.main([str(tmp_path / "runs"), "--out", str(out)]) == 0
    table = (out / "TABLE.md").read_text()
    for label in ("exact backprop", "BASIS R=8", "BASIS R=1"):
        assert f"| {label} |" in table and "| 1 |" in table.split(f"| {label} |")[1].split("\n")[0]


@pytest.mark.slow
def test_submitit_local_multirun(tmp_path, corpus):
    sweep = [
        "-m",
        "experiment=smoke",
        f"data.dir={corpus}",
        *TINY_RUN,
        METHODS,
        "hydra/launcher=local_submitit",
        "hydra.sweeper.max_batch_size=2",
        f"hydra.sweep.dir={tmp_path}/mr",
    ]
    proc = run_cli(sweep, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summaries = _summaries(tmp_path)
    assert set(summaries) == {"exact-s0", "basis-r8-s0", "basis-r1-s0"}
    assert all(s["finished"] for s in summaries.values())
    assert len(list((tmp_path / "mr" / ".submitit").glob("*/*_log.out"))) == 3
