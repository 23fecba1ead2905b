"""launcher.compare on real (tiny) runs: numbers equal to those computed here from metrics.jsonl."""

from __future__ import annotations

import csv
import io
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from launcher import compare
from launcher.compare import Run, group_runs, load_runs, plot_runs

from helpers import ROOT, run

TINY = {"train.num_epochs": 3, "task.options.num_train": 384, "task.options.num_test": 128,
        "train.progress_bar": "off", "checkpoint.enabled": False}
TINY_ARGS = [f"--{k}={v}" for k, v in TINY.items()]


def cli(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "launcher.compare", *args], timeout=timeout)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> list[str]:
    """Two seeds of the fast recipe and one run of the paper's recipe, trained in this process."""
    import torch

    from launcher.train import main

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("runs")
    made = []
    for recipe, seed in (("mnist1d", 0), ("mnist1d", 1), ("mnist1d_paper", 0)):
        out = root / f"{recipe}-seed{seed}"
        main(recipe=str(ROOT / f"recipes/{recipe}.yaml"), output_dir=str(out), **{**TINY, "train.seed": seed})
        made.append(str(out))
    return made


def rows_of(run_dir: str) -> list[dict]:
    return [json.loads(line) for line in Path(run_dir, "metrics.jsonl").read_text().splitlines()]


def first_reaching(rows: list[dict], target: float) -> dict | None:
    for row in rows:
        if "val/accuracy" in row and row["val/accuracy"] >= target:
            return row
    return None


def middle_targets(run_dirs: list[str]) -> list[float]:
    """Targets some evaluations reach and some do not, so both cases are checked."""
    values = sorted(r["val/accuracy"] for d in run_dirs for r in rows_of(d) if "val/accuracy" in r)
    return [round(values[len(values) // 3], 4), round(values[(2 * len(values)) // 3], 4)]


def test_json_numbers_equal_those_from_metrics_jsonl(runs, tmp_path):
    targets = middle_targets(runs)
    png = tmp_path / "plots" / "cmp.png"
    proc = cli(*runs, "--targets", ",".join(map(str, targets)), "--format", "json", "--plot", str(png))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["metric"] == "val/accuracy" and result["targets"] == targets

    reached_any = missed_any = False
    for run_dir, got in zip(runs, result["runs"]):
        rows = rows_of(run_dir)
        evals = [r for r in rows if "val/accuracy" in r]
        for t in targets:
            hit = first_reaching(rows, t)
            reached_any |= hit is not None
            missed_any |= hit is None
            assert got[f"epochs_to/{t:g}"] == (hit["epoch"] if hit else None)
            assert got[f"steps_to/{t:g}"] == (hit["step"] if hit else None)
            assert got[f"seconds_to/{t:g}"] == (hit["time/elapsed"] if hit else None)
        assert got["best"] == max(r["val/accuracy"] for r in evals)
        assert got["final"] == evals[-1]["val/accuracy"]
        assert got["final_lr"] == [r["lr"] for r in rows if "lr" in r][-1]
        assert got["final_step"] == rows[-1]["step"]
    assert reached_any and missed_any

    fast, paper = result["groups"]
    assert (fast["label"], fast["n"], fast["seeds"]) == ("mnist1d", 2, [0, 1])
    assert (paper["label"], paper["n"], paper["seeds"]) == ("mnist1d_paper", 1, [0])
    bests = [result["runs"][0]["best"], result["runs"][1]["best"]]
    assert fast["stats"]["best"]["mean"] == pytest.approx(statistics.fmean(bests))
    assert fast["stats"]["best"]["std"] == pytest.approx(statistics.stdev(bests))
    assert (fast["stats"]["best"]["min"], fast["stats"]["best"]["max"]) == (min(bests), max(bests))
    [ratio] = result["ratios"]
    assert (ratio["baseline"], ratio["group"]) == ("mnist1d", "mnist1d_paper")
    assert ratio["best_difference"] == pytest.approx(result["runs"][2]["best"] - statistics.fmean(bests))
    for t in targets:
        base, other = fast["stats"][f"epochs_to/{t:g}"]["mean"], paper["stats"][f"epochs_to/{t:g}"]["mean"]
        assert ratio[f"epochs_to/{t:g}"] == (pytest.approx(base / other) if base and other else None)

    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_has_three_panels_against_epoch(runs, tmp_path):
    loaded = [r for d in runs for r in load_runs(d)]
    result = compare.compare_runs(loaded, "val/accuracy", [0.5])
    fig = plot_runs(loaded, result, str(tmp_path / "p.png"))
    assert len(fig.axes) == 3
    assert [ax.get_xlabel() for ax in fig.axes] == ["epoch"] * 3
    titles = [ax.get_title() for ax in fig.axes]
    assert "learning rate" in titles[0] and titles[1] == "val/accuracy" and "train loss" in titles[2]
    assert len(fig.axes[0].get_lines()) == 3  # one LR curve per run
    steps = len([r for r in rows_of(runs[0]) if "lr" in r])
    assert len(fig.axes[0].get_lines()[0].get_xdata()) == steps  # every optimizer step


def test_table_markdown_and_csv(runs, capsys):
    compare.main(*runs, targets="0.2")
    table = capsys.readouterr().out
    assert "epochs to 20%" in table and "best val/accuracy" in table
    fast_line = next(line for line in table.splitlines() if line.startswith("mnist1d "))
    assert "±" in fast_line and " 2 " in fast_line  # n = 2 seeds, mean ± std
    assert "mnist1d_paper vs mnist1d:" in table

    compare.main(*runs, targets="0.2", format="markdown")
    markdown = capsys.readouterr().out
    assert markdown.splitlines()[0].startswith("| run | n | best val/accuracy")

    compare.main(*runs, targets="0.2", format="csv")
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [(r["run"], r["n"], r["seeds"]) for r in rows] == [("mnist1d", "2", "0 1"), ("mnist1d_paper", "1", "0")]
    assert float(rows[1]["best"]) == pytest.approx(max(r["val/accuracy"] for r in rows_of(runs[2]) if "val/accuracy" in r),
                                                   rel=1e-5)


def test_seeds_group_only_when_nothing_but_the_seed_differs():
    def run(label: str, changes: dict | None = None) -> Run:
        config = {"name": "r", "optim.lr": 0.01, "train.seed": 0, "tracking.wandb.name": label,
                  "train.progress_bar": "auto", "checkpoint.keep_last": 2, "plan.num_processes": 1, "plan.device": "cpu"}
        return Run(name=label, source=label, config={**config, **(changes or {})}, rows=[])

    runs = [run("a0"),
            run("a1", {"train.seed": 1, "tracking.wandb.name": "x", "checkpoint.keep_last": 5, "plan.device": "cuda:0",
                       "name": "other-name"}),
            run("lr", {"optim.lr": 0.02}), run("ddp", {"plan.num_processes": 2}), run("a2", {"train.seed": 2}),
            Run(name="no-config-1", source="x"), Run(name="no-config-2", source="y")]
    assert group_runs(runs) == [[0, 1, 4], [2], [3], [5], [6]]


@pytest.mark.parametrize("args, message", [
    (["/nonexistent/run"], "not found"),
    (["runs/compare-readme/mnist1d_fast-seed9"], "no such run directory"),  # not a W&B entity/project/run
    (["tests/no-such/run"], "no such run directory"),
    (["RUN", "--targets", "abc"], "--targets"),
    (["RUN", "--targets", "0.5,-1"], "--targets"),
    (["RUN", "--format", "xml"], "--format"),
    (["RUN", "--metric", "val/nope"], "val/nope"),
    (["RUN", "--optim.lr=0.1"], "only with --train"),
    ([], "nothing to compare"),
])
def test_bad_input_is_one_line_and_exit_2(runs, args, message, capsys, monkeypatch):
    from launcher.compare import cli as compare_cli

    monkeypatch.setattr(sys, "argv", ["launcher.compare", *[runs[0] if a == "RUN" else a for a in args]])
    with pytest.raises(SystemExit) as exit_info:
        compare_cli()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err


def test_train_runs_each_seed_shows_progress_and_resumes_the_comparison(tmp_path):
    out = tmp_path / "cmp"
    bad = cli("--train", "recipes/mnist1d.yaml", "--output_dir", str(out), "--optim.lr=-1")
    assert bad.returncode == 2 and bad.stderr.startswith("error: optim.lr") and not out.exists()

    args = ["--train", "recipes/mnist1d.yaml", "--seeds", "2", "--output_dir", str(out), "--targets", "0.1",
            "--format", "json", *TINY_ARGS, "--train.num_epochs=1", "--task.options.num_train=256"]
    proc = cli(*args, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    progress = proc.stdout[:proc.stdout.index("{")]
    assert "[1/2 mnist1d-seed0] training recipes/mnist1d.yaml seed 0" in progress
    assert "[2/2 mnist1d-seed1] epoch 1/1" in progress
    result = json.loads(proc.stdout[proc.stdout.index("{"):])
    [group] = result["groups"]
    assert (group["n"], group["seeds"]) == (2, [0, 1])
    assert {p.name for p in out.iterdir()} >= {"mnist1d-seed0", "mnist1d-seed1", "logs", "compare.md", "compare.json",
                                               "compare.png"}
    assert json.loads((out / "mnist1d-seed1" / "summary.json").read_text())["status"] == "completed"

    again = cli(*args)
    assert again.returncode == 0
    assert again.stdout.count("already completed") == 2
    assert json.loads(again.stdout[again.stdout.index("{"):])["runs"] == result["runs"]


def test_wandb_path_without_a_key_says_how_to_authenticate(monkeypatch, tmp_path):
    for var in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("NETRC", str(tmp_path / "missing-netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(compare.UsageError, match="needs an API key: set WANDB_API_KEY"):
        compare.main("my-team/my-project/group:lr-sweep")
