"""launcher.sweep on real (tiny) MNIST-1D runs: a 2 x 2 x 2 sweep, interrupted and continued; its numbers
against metrics.jsonl; the best point applied; bad input; the job array script (no cluster)."""

from __future__ import annotations

import json
import math
import os
import signal
import statistics
import sys
import time
from pathlib import Path

import pytest
import yaml

from launcher import sweep
from launcher.config import load_config

from helpers import ROOT, assert_usage_error, kill_group, run, start

RECIPE = str(ROOT / "recipes" / "mnist1d.yaml")
TINY = ["--train.num_epochs=3", "--task.options.num_train=256", "--task.options.num_test=128"]
GRID = ["--grid", "optim.lr=5e-3,2e-2", "--grid", "schedule.decay_rate=0.8,0.96", "--seeds", "2"]
NAMES = {f"lr{lr}-decay_rate{d}-seed{s}" for lr in ("0.005", "0.02") for d in ("0.8", "0.96") for s in (0, 1)}


def sweep_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "launcher.sweep", "--recipe", RECIPE, *args]


def completed(out: Path) -> set[str]:
    done = set()
    for summary in out.glob("*/summary.json"):
        if json.loads(summary.read_text()).get("status") == "completed":
            done.add(summary.parent.name)
    return done


def best_of(run_dir: Path) -> float:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return max(r["val/accuracy"] for r in rows if "val/accuracy" in r)


@pytest.mark.slow
def test_sweep_interrupted_continues_then_reruns_nothing(tmp_path):
    out = tmp_path / "sw"
    cmd = sweep_cmd(*GRID, "--output_dir", str(out), *TINY)
    proc = start(cmd)
    try:
        deadline = time.monotonic() + 240
        while len(completed(out)) < 2:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no two runs completed in 240 s"
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGINT)  # Ctrl-C: reaches the sweep only, which stops its training cleanly
        _, stderr = proc.communicate(timeout=90)
    finally:
        kill_group(proc)
    assert proc.returncode == 130, stderr[-2000:]
    assert "to continue, run: python -m launcher.sweep" in stderr and "--output_dir" in stderr
    first = completed(out)
    assert 2 <= len(first) < 8, first
    stamps = {name: (out / name / "summary.json").read_bytes() for name in first}

    again = run(cmd, timeout=400)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert {p.name for p in out.iterdir() if (p / "metrics.jsonl").exists() and ".incomplete-" not in p.name} == NAMES
    assert completed(out) == NAMES
    for name in first:  # finished points are not trained again
        assert f"{name}] already completed" in again.stdout
        assert (out / name / "summary.json").read_bytes() == stamps[name]
    assert again.stdout.count("] training ") == 8 - len(first)
    for name in ("sweep.md", "sweep.json", "sweep.png"):
        assert (out / name).is_file()

    # The numbers: mean and std over the seeds of each point, from metrics.jsonl.
    result = json.loads((out / "sweep.json").read_text())["results"]
    assert result["keys"] == ["optim.lr", "schedule.decay_rate"]
    assert len(result["points"]) == 4
    means = {}
    for point in result["points"]:
        bests = [best_of(out / f"{point['point']}-seed{s}") for s in (0, 1)]
        assert point["n"] == 2 and point["seeds"] == [0, 1]
        assert point["stats"]["best"]["mean"] == pytest.approx(statistics.fmean(bests))
        assert point["stats"]["best"]["std"] == pytest.approx(statistics.stdev(bests))
        means[point["point"]] = statistics.fmean(bests)
    assert result["best"] == max(means, key=means.get)
    md = (out / "sweep.md").read_text()
    assert "| optim.lr | schedule.decay_rate | n | best val/accuracy" in md and f"best: {result['best']}" in md

    # The same command once more trains nothing, and --apply writes the best point as a recipe.
    applied = tmp_path / "best.yaml"
    third = run([*cmd, "--apply", str(applied)], timeout=200)
    assert third.returncode == 0, third.stderr[-2000:]
    assert third.stdout.count("already completed") == 8 and "] training " not in third.stdout
    best = next(p for p in result["points"] if p["point"] == result["best"])
    cfg = load_config(applied)
    assert cfg.optim.lr == best["values"]["optim.lr"]
    assert cfg.schedule.decay_rate == best["values"]["schedule.decay_rate"]
    assert cfg.train.num_epochs == 3
    assert "# MNIST-1D" in applied.read_text()  # the recipe's comments are kept

    # launcher.compare reads the sweep directory and groups by everything but the seed.
    cmp = run([sys.executable, "-m", "launcher.compare", str(out), "--format", "json"], timeout=120)
    assert cmp.returncode == 0, cmp.stderr
    groups = json.loads(cmp.stdout)["groups"]
    assert sorted((g["n"], tuple(g["seeds"])) for g in groups) == [(2, (0, 1))] * 4
    assert all("optim.lr=" in g["label"] and "schedule.decay_rate=" in g["label"] for g in groups)


@pytest.mark.slow
def test_parallel_runs_with_accelerate_config_and_group_and_tags(tmp_path):
    out = tmp_path / "par"
    proc = run(sweep_cmd("--grid", "optim.lr=5e-3,2e-2", "--parallel", "2", "--accelerate_config",
                         str(ROOT / "accelerate_configs" / "cpu_ddp.yaml"), "--output_dir", str(out),
                         "--train.num_epochs=1", "--task.options.num_train=256", "--task.options.num_test=128"),
               timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("lr0.005-seed0", "lr0.02-seed0"):
        assert json.loads((out / name / "plan.json").read_text())["num_processes"] == 2
        config = yaml.safe_load((out / name / "config.yaml").read_text())
        assert config["tracking"]["wandb"]["group"] == "par"
        assert f"optim.lr={name[2:-6]}" in config["tracking"]["wandb"]["tags"]


def test_random_points_are_seeded_and_in_range():
    grid = sweep.parse_grid(["optim.lr=1e-4:1e-1", "schedule.warmup_epochs=0:3", "schedule.decay=exponential,cosine"],
                            random_points=20)
    a, b = sweep.sample(grid, 20, 7), sweep.sample(grid, 20, 7)
    assert a == b and a != sweep.sample(grid, 20, 8)
    assert len({json.dumps(p, sort_keys=True) for p in a}) == 20
    lrs = [p["optim.lr"] for p in a]
    assert all(1e-4 <= x <= 1e-1 for x in lrs)
    assert sum(x < 1e-2 for x in lrs) >= 8  # log-uniform: two of three decades lie below 1e-2
    assert all(isinstance(p["schedule.warmup_epochs"], int) and 0 <= p["schedule.warmup_epochs"] <= 3 for p in a)
    assert {p["schedule.decay"] for p in a} == {"exponential", "cosine"}
    assert all(math.isclose(x, float(f"{x:.3g}")) for x in lrs)


@pytest.mark.parametrize("args, message", [
    (["--grid", "optim.lrr=1,2"], "optim.lrr"),
    (["--grid", "optim.lr=1e-4:1e-2"], "needs --random"),
    (["--grid", "optim.lr=-1,0.1"], "optim.lr"),
    (["--grid", "optim.lr"], "--grid"),
    (["--grid", "train.seed=1,2"], "--seeds"),
    (["--grid", "optim.lr=0.1", "--seeds", "0"], "--seeds"),
    (["--grid", "optim.lr=0.1", "--parallel", "0"], "--parallel"),
    (["--grid", "optim.lr=0.1", "--optim.nope=1"], "optim.nope"),
    ([], "nothing to sweep"),
    (["--grid", "optim.lr=0.1", "--slurm"], "--time"),
    (["--grid", "optim.lr=0.1", "--time", "00:10:00"], "only with --slurm"),
    (["--grid", "optim.lr=0.1", "--slurm", "--time", "00:10:00", "--nodes", "2"], "--nodes"),
    (["--grid", "optim.lr=0.1", "--slurm", "--time", "1h"], "--time"),
    (["--grid", "optim.lr=0.1", "--apply", "/nonexistent/dir/x.yaml"], "--apply"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, args, message):
    out = tmp_path / "sw"
    proc = run(sweep_cmd(*args, "--output_dir", str(out)), timeout=120)
    assert_usage_error(proc, message)
    assert not out.exists()


def test_a_different_sweep_in_the_same_directory_is_refused(tmp_path):
    out = tmp_path / "sw"
    out.mkdir()
    (out / "sweep.json").write_text(json.dumps({"sweep": {"recipe": RECIPE, "keys": ["optim.lr"]}}))
    before = (out / "sweep.json").read_text()
    proc = run(sweep_cmd("--grid", "optim.lr=0.1", "--output_dir", str(out)), timeout=120)
    assert_usage_error(proc, "holds a different sweep")
    assert (out / "sweep.json").read_text() == before and len(list(out.iterdir())) == 1


def test_slurm_dry_run_prints_one_array_and_writes_nothing(tmp_path):
    out = tmp_path / "sw"
    proc = run(sweep_cmd("--grid", "optim.lr=5e-3,2e-2", "--grid", "schedule.warmup_epochs=0,1", "--seeds", "2",
                         "--slurm", "--time", "00:10:00", "--parallel", "3", "--dry_run", "--output_dir", str(out),
                         "--train.num_epochs=1"), timeout=120)
    assert proc.returncode == 0, proc.stderr
    script = proc.stdout
    assert "#SBATCH --array=0-7%3" in script
    assert f"#SBATCH --output={out}/slurm/%x-%A_%a.out" in script
    assert script.count("RUN_DIR=") == 8 and "--resume auto" in script
    assert f"RUN_DIR={out}/lr0.02-warmup_epochs1-seed1" in script
    assert "--optim.lr=0.02 --schedule.warmup_epochs=1 --train.seed=1" in script
    assert "scontrol requeue" in script
    assert not out.exists()


def test_help_lists_the_options():
    proc = run([sys.executable, "-m", "launcher.sweep", "--help"], timeout=60)
    assert proc.returncode == 0
    for option in ("--grid", "--random", "--seeds", "--parallel", "--slurm", "--apply", "--dry_run"):
        assert option in proc.stdout


@pytest.mark.slow
def test_wandb_offline_one_group_tags_and_the_sweep_table(tmp_path):
    from launcher.runs import load_runs, read_wandb_records

    out = tmp_path / "wb"
    proc = run(sweep_cmd("--grid", "optim.lr=2e-2", "--output_dir", str(out), "--tracking.wandb.enabled=true",
                         "--train.num_epochs=1", "--task.options.num_train=256", "--task.options.num_test=128"),
               timeout=300, WANDB_MODE="offline", WANDB_DIR=str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    [train_log] = (out / "lr0.02-seed0" / "wandb").glob("offline-run-*/run-*.wandb")
    [sweep_log] = (out / "wandb").glob("offline-run-*/run-*.wandb")
    runs = {}
    for path in (train_log, sweep_log):
        records = list(read_wandb_records(path))
        [meta] = [r.run for r in records if r.WhichOneof("record_type") == "run"]
        keys = {i.key or ".".join(i.nested_key) for r in records if r.WhichOneof("record_type") == "history"
                for i in r.history.item}
        runs[meta.job_type] = (meta.run_group, set(meta.tags), keys)
    assert runs["train"][:2] == ("wb", {"sweep", "optim.lr=0.02"})
    assert runs["sweep"][0] == "wb"
    assert any(k.startswith("sweep/table") for k in runs["sweep"][2])
    assert any(k.startswith("sweep/plot") for k in runs["sweep"][2])
    assert [r.name for r in load_runs(str(out))] == ["lr0.02-seed0"]  # the sweep's own W&B run is not a run


@pytest.mark.slow
def test_killed_runs_resume_from_their_checkpoints(tmp_path):
    out = tmp_path / "sw"
    cmd = sweep_cmd("--grid", "optim.lr=2e-2", "--seeds", "2", "--output_dir", str(out), *TINY)
    killed = run(cmd, timeout=300, LAUNCHER_TEST_KILL_AT_STEP="12")  # 8 steps an epoch: after the first checkpoint
    assert killed.returncode == 1, killed.stdout[-3000:]
    assert killed.stdout.count("FAILED with exit status -9") == 2
    assert not (out / "sweep.md").exists()

    again = run(cmd, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert again.stdout.count("incomplete; resuming from its last checkpoint") == 2
    for seed in (0, 1):
        log = (out / "logs" / f"lr0.02-seed{seed}.log").read_text()
        commands = [line for line in log.splitlines() if line.startswith("$ ")]
        assert len(commands) == 2 and "--resume" not in commands[0] and commands[1].endswith("--resume auto")
        summary = json.loads((out / f"lr0.02-seed{seed}" / "summary.json").read_text())
        assert summary["status"] == "completed" and summary["final_step"] == 24


def test_compare_reads_exactly_the_runs_a_sweep_lists(tmp_path):
    from launcher.runs import load_runs

    out = tmp_path / "sw"
    for name in ("lr0.02-seed0", "lr0.005-seed0", "lr0.005-seed0.incomplete-20250101-000000", "unrelated"):
        (out / name).mkdir(parents=True)
        (out / name / "metrics.jsonl").write_text(json.dumps({"step": 1, "epoch": 1, "val/accuracy": 0.5}) + "\n")
    (out / "sweep.json").write_text(json.dumps({"runs": [{"dir": "lr0.005-seed0"}, {"dir": "lr0.02-seed0"}]}))
    assert [r.name for r in load_runs(str(out))] == ["lr0.005-seed0", "lr0.02-seed0"]
    (out / "sweep.json").unlink()  # a compare --train folder: every run directory but the ones set aside
    assert [r.name for r in load_runs(str(out))] == ["lr0.005-seed0", "lr0.02-seed0", "unrelated"]


def test_local_dry_run_prints_every_training_command(tmp_path):
    out = tmp_path / "sw"
    proc = run(sweep_cmd(*GRID, "--output_dir", str(out), "--dry_run", "--train.num_epochs=2"), timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 8 and all(" -m launcher.train --recipe " in line for line in lines)
    assert {line.rsplit("--output_dir ", 1)[1] for line in lines} == {str(out / n) for n in NAMES}
    assert all("--train.num_epochs=2" in line for line in lines)
    assert not out.exists()
