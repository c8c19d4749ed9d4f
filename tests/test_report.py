"""scripts/report.py on run directories written here in train.py's format."""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

import pytest
import yaml

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))

import report  # noqa: E402

PAPER_LAYERS = ["transformer.h.*.mlp.c_fc", "transformer.h.*.mlp.c_proj", "lm_head"]
STEPS = 1000
OFFSET = {
    "exact": 0.0,
    "basis-r64": -0.01,
    "basis-r32": 0.02,
    "basis-r16": 0.05,
    "basis-r8": 0.1,
    "basis-r1": 0.6,
    "basis-r32-uniform": 0.07,
}


def _method(tag: str) -> dict:
    if tag == "exact":
        return {"name": "exact"}
    rank = int(tag.split("-")[1][1:])
    return {
        "name": "basis",
        "rank": rank,
        "lam": 0.01,
        "scale": 1.0,
        "eps": 1e-8,
        "hashing": "uniform" if tag.endswith("uniform") else "balanced",
        "invariant_scalars": True,
        "layers": PAPER_LAYERS,
    }


def final(tag: str, seed: int, kind: str) -> float:
    """The fixture's final losses: a per-row offset plus a per-seed shift shared by all rows
    (paired seeds), plus a small per-(row, seed) wobble."""
    base = {"train": 6.8, "val": 6.6, "val_fixed": 6.5}[kind]
    return base + OFFSET[tag] + 0.03 * seed + 0.001 * ((seed * 7 + len(tag)) % 5)


def write_run(
    root: Path,
    tag: str,
    seed: int,
    *,
    experiment: str = "paper-shakespeare",
    upto: int = STEPS,
    finished: bool = True,
) -> Path:
    path = root / experiment / f"{tag}-s{seed}"
    path.mkdir(parents=True)
    config = {
        "experiment_name": experiment,
        "seed": seed,
        "threads": 1,
        "train": {"steps": STEPS, "batch_size": 1, "block_size": 64},
        "eval": {"every": 100},
        "method": _method(tag),
    }
    (path / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    lines = []
    for step in range(100, upto + 1, 100):
        decay = 3.0 * math.exp(-step / 300)
        row = {
            "step": step,
            "train_loss": final(tag, seed, "train") + decay,
            "val_loss": final(tag, seed, "val") + decay,
            "val_loss_fixed": final(tag, seed, "val_fixed") + decay,
            "tokens": 64 * step,
        }
        lines.append(json.dumps(row))
    (path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    if finished:
        summary = {
            "finished": True,
            "steps": STEPS,
            "method_tag": tag,
            "seed": seed,
            "experiment": experiment,
            "ms_per_step": 12.5,
            "final_train_loss": final(tag, seed, "train"),
            "final_val_loss": final(tag, seed, "val"),
            "final_val_loss_fixed": final(tag, seed, "val_fixed"),
        }
        (path / "summary.json").write_text(json.dumps(summary))
    return path


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    root = tmp_path / "runs"
    for tag in report.MAIN_ROWS:
        for seed in (1, 2, 3):
            if tag == "basis-r16" and seed == 3:
                continue  # a missing seed
            write_run(
                root,
                tag,
                seed,
                finished=not (tag == "basis-r8" and seed == 2),
                upto=500 if (tag == "basis-r8" and seed == 2) else STEPS,
            )
    for seed in (1, 2, 3):
        write_run(root, "basis-r32-uniform", seed)
    return root


def _row(table: str, label: str) -> list[str]:
    for line in table.splitlines():
        if line.startswith(f"| {label} |"):
            return [c.strip() for c in line.strip("|").split("|")]
    raise AssertionError(f"no row {label!r} in\n{table}")


def test_table_numbers_paired_differences_and_paper(runs, tmp_path, capsys):
    out = tmp_path / "out"
    assert report.main([str(runs), "--out", str(out)]) == 0
    table = (out / "TABLE.md").read_text()
    assert table.strip() in capsys.readouterr().out

    exact = _row(table, "exact backprop")
    vals = [final("exact", s, "val") for s in (1, 2, 3)]
    assert exact[2] == "3"
    assert exact[4] == f"{statistics.mean(vals):.3f} ± {statistics.stdev(vals):.3f}"
    assert exact[8:10] == ["6.718", "6.616"]

    r32 = _row(table, "BASIS R=32")
    assert r32[1] == "32 (2×)"
    diffs = [final("basis-r32", s, "val_fixed") - final("exact", s, "val_fixed") for s in (1, 2, 3)]
    assert r32[7] == f"{statistics.mean(diffs):+.3f} ± {statistics.stdev(diffs):.3f} (n=3)"
    # The per-seed shift cancels in the paired difference, not in the rows' own spread.
    assert statistics.stdev(diffs) < 0.01 < statistics.stdev(vals)
    assert r32[9] == "6.575"

    r8 = _row(table, "BASIS R=8")  # seed 2 unfinished: two seeds, two pairs
    assert r8[2] == "2" and r8[6].endswith("(n=2)")
    r16 = _row(table, "BASIS R=16")  # seed 3 missing
    assert r16[2] == "2"
    uniform = _row(table, "uniform hashing, R=32")
    assert uniform[8:10] == ["–", "–"] and uniform[2] == "3"

    # Order: the paper's rows, then the ablation.
    main = table.split("### Paired differences per seed")[0]  # not the per-seed table below it
    labels = [line.split("|")[1].strip() for line in main.splitlines() if line.startswith("| ")]
    assert labels[1:] == [
        "exact backprop",
        "BASIS R=64",
        "BASIS R=32",
        "BASIS R=16",
        "BASIS R=8",
        "BASIS R=1",
        "uniform hashing, R=32",
    ]

    notes = table.split("### Missing or unfinished")[1]
    assert "BASIS R=16: no run for seed(s) 3" in notes
    assert "BASIS R=8 seed 2: unfinished, at step 500 of 1000" in notes

    for name in ("figure1.png", "figure1_fixed.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
        assert f"]({name})" in table
    data = json.loads((out / "report.json").read_text())["paper-shakespeare"]
    assert data["seeds"] == [1, 2, 3]
    by_tag = {r["tag"]: r for r in data["rows"]}
    assert by_tag["basis-r8"]["seeds"] == [1, 3]
    assert by_tag["exact"]["val"]["mean"] == pytest.approx(statistics.mean(vals))


def test_expected_seeds_and_rows_without_any_run(tmp_path):
    root = tmp_path / "runs"
    write_run(root, "exact", 1)
    write_run(root, "basis-r32", 1)
    out = tmp_path / "out"
    assert report.main([str(root), "--out", str(out), "--seeds", "1,2"]) == 0
    table = (out / "TABLE.md").read_text()
    assert _row(table, "BASIS R=1")[2] == "0"  # the paper's rows are always shown
    assert "BASIS R=1: no run for seed(s) 1, 2" in table
    assert "exact backprop: no run for seed(s) 2" in table
    assert (
        _row(table, "BASIS R=32")[6]
        == f"{final('basis-r32', 1, 'val') - final('exact', 1, 'val'):+.3f} (n=1)"
    )


def test_broken_duplicate_and_nameless_runs_are_reported_not_fatal(tmp_path):
    root = tmp_path / "runs"
    write_run(root, "exact", 1)
    copy = write_run(tmp_path / "results", "exact", 1, upto=300, finished=False)
    broken = root / "paper-shakespeare" / "basis-r8-s1"
    broken.mkdir()
    (broken / "config.yaml").write_text(": not yaml [")
    (broken / "metrics.jsonl").write_text('{"step": 100, "val_loss": 7.5}\n{"step": 2')
    out = tmp_path / "out"
    assert report.main([str(root), str(tmp_path / "results"), "--out", str(out)]) == 0
    table = (out / "TABLE.md").read_text()
    assert "config.yaml unreadable" in table and "1 unreadable line(s) in metrics.jsonl" in table
    assert f"ignoring `{copy}`" in table
    # The nameless broken run still gets its row from the directory name, as unfinished.
    assert "BASIS R=8 seed 1: unfinished, at step 100" in table


def test_several_experiments_get_a_figure_each(tmp_path):
    root = tmp_path / "runs"
    for exp in ("paper-shakespeare", "demo"):
        write_run(root, "exact", 1, experiment=exp)
        write_run(root, "basis-r1", 1, experiment=exp)
    out = tmp_path / "out"
    assert report.main([str(root), "--out", str(out)]) == 0
    assert (out / "figure1-demo.png").is_file() and (
        out / "figure1-paper-shakespeare.png"
    ).is_file()
    out2 = tmp_path / "out2"
    assert report.main([str(root), "--out", str(out2), "--experiment", "demo"]) == 0
    assert (out2 / "figure1.png").is_file()
    assert "paper-shakespeare" not in (out2 / "TABLE.md").read_text()


def test_a_single_run_directory_is_accepted(tmp_path):
    path = write_run(tmp_path, "basis-r32", 4)
    out = tmp_path / "out"
    assert report.main([str(path), "--out", str(out)]) == 0
    assert _row((out / "TABLE.md").read_text(), "BASIS R=32")[2] == "1"


class _FakeRun:
    def __init__(self, tag: str, seed: int) -> None:
        self.name, self.path = f"{tag}-s{seed}", ["me", "basis", f"id{seed}{tag}"]
        self.config = {
            "experiment_name": "paper-shakespeare",
            "seed": seed,
            "train": {"steps": STEPS, "batch_size": 1, "block_size": 64},
            "method": _method(tag),
        }
        self.summary = {
            "finished": True,
            "method_tag": tag,
            "seed": seed,
            "steps": STEPS,
            "final_train_loss": 6.9,
            "final_val_loss": final(tag, seed, "val"),
            "final_val_loss_fixed": 6.4,
            "_wandb": {"runtime": 3},
        }

    def scan_history(self, keys):
        return [{"step": s, "val_loss": 7.0 - s / 1e4, "_step": s} for s in (100, 200)]


class _FakeApi:
    def __init__(self) -> None:
        self.calls = []

    def runs(self, path, filters=None):
        self.calls.append((path, filters))
        return [_FakeRun("exact", 1), _FakeRun("basis-r32", 1)]


def test_runs_from_wandb_map_onto_run_directories():
    api = _FakeApi()
    runs = report.runs_from_wandb("me/basis:paper-shakespeare", api=api)
    assert api.calls == [("me/basis", {"group": "paper-shakespeare"})]
    assert [(r.tag, r.seed, r.finished) for r in runs] == [
        ("exact", 1, True),
        ("basis-r32", 1, True),
    ]
    assert runs[0].curves["val_loss"] == [(100, 6.99), (200, 6.98)]
    with pytest.raises(report.UsageError):
        report.runs_from_wandb("no-slash", api=api)


@pytest.mark.parametrize(
    "make_args, message",
    [
        (lambda tmp: [str(tmp / "nope"), "--out", str(tmp / "o")], "no such directory"),
        (lambda tmp: [str(tmp), "--out", str(tmp / "o")], "no run directories"),
        (lambda tmp: ["--out", str(tmp / "o")], "at least one run directory"),
        (lambda tmp: [str(tmp), "--out", str(tmp / "o"), "--seeds", "a"], "--seeds"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, make_args, message):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        report.main(make_args(tmp_path))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_zoom_panel_leaves_far_outliers_off_scale():
    rows = [
        ("exact", 6.6, 6.7, 6.65),
        ("R=32", 6.62, 6.72, 6.67),
        ("R=8", 6.7, 6.8, 6.75),
        ("R=1", 7.2, 7.3, 7.25),
    ]
    shown, off = report._zoom_rows(rows)
    assert [z[0] for z in off] == ["R=1"] and len(shown) == 3
    close = rows[:3] + [("R=4", 6.8, 6.9, 6.85)]
    assert report._zoom_rows(close) == (sorted(close, key=lambda z: z[3]), [])


def test_include_unfinished_draws_partial_curves(runs, tmp_path):
    out = tmp_path / "out"
    assert report.main([str(runs), "--out", str(out), "--include-unfinished"]) == 0
    assert (out / "figure1.png").stat().st_size > 10_000
    # The table still counts finished runs only.
    assert _row((out / "TABLE.md").read_text(), "BASIS R=8")[2] == "2"


def test_ablations_are_paired_with_the_method_they_change(runs, tmp_path):
    out = tmp_path / "out"
    assert report.main([str(runs), "--out", str(out)]) == 0
    block = (out / "TABLE.md").read_text().split("### Ablations against the method they change")
    block = block[1].split("###")[0]
    diffs = [
        final("basis-r32-uniform", s, "val_fixed") - final("basis-r32", s, "val_fixed")
        for s in (1, 2, 3)
    ]
    for seed, d in zip((1, 2, 3), diffs, strict=True):
        row = _row(block, f"uniform hashing, R=32 | BASIS R=32 | {seed}")
        assert row[3].startswith(f"{d:+.3f}")  # uniform minus balanced hashing, same seed
    mean = _row(block, "uniform hashing, R=32 | BASIS R=32 | mean")
    assert mean[3] == f"{statistics.mean(diffs):+.3f} ± {statistics.stdev(diffs):.3f} (n=3)"
    # The fixture's uniform rows sit 0.05 above balanced ones: the ablation's own cost, not
    # its cost against exact backprop (0.07).
    assert statistics.mean(diffs) == pytest.approx(0.05, abs=0.005)
    data = json.loads((out / "report.json").read_text())["paper-shakespeare"]
    vs = {r["tag"]: r for r in data["rows"]}["basis-r32-uniform"]["vs_base"]
    assert vs["base"] == "basis-r32" and [p["seed"] for p in vs["pairs"]] == [1, 2, 3]


def test_readme_blocks_are_rewritten_from_the_runs(runs, tmp_path, capsys):
    readme = tmp_path / "README.md"
    before = "intro\n<!-- report:table -->\nold table\n<!-- /report:table -->\nmiddle\n"
    before += "<!-- report:pairs -->\nold\n<!-- /report:pairs -->\n"
    before += "<!-- report:ablations -->\nold\n<!-- /report:ablations -->\nend\n"
    readme.write_text(before)
    out = tmp_path / "out"
    assert report.main([str(runs), "--out", str(out), "--readme", str(readme)]) == 0
    text = readme.read_text()
    table = (out / "TABLE.md").read_text()
    assert "old" not in text and text.startswith("intro\n") and text.endswith("end\n")
    block = text.split("<!-- report:table -->\n")[1].split("\n<!-- /report:table -->")[0]
    assert block in table and _row(block, "BASIS R=32") == _row(table, "BASIS R=32")
    pairs = text.split("<!-- report:pairs -->\n")[1].split("\n<!-- /report:pairs -->")[0]
    assert pairs in table.split("### Paired differences per seed")[1]
    ablations = text.split("<!-- report:ablations -->\n")[1].split("\n<!-- /report:ablations -->")[
        0
    ]
    assert ablations in table.split("### Ablations against the method they change")[1]
    # A second run changes nothing: the blocks are replaced, not appended to.
    assert report.main([str(runs), "--out", str(out), "--readme", str(readme)]) == 0
    assert readme.read_text() == text

    readme.write_text("no markers here\n")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        report.main([str(runs), "--out", str(out), "--readme", str(readme)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "report:table" in err and len(err.strip().splitlines()) == 1
    assert readme.read_text() == "no markers here\n"  # untouched
