"""The real training CLI end to end: the quick recipe, the run directory contract, user errors."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest
import yaml

from helpers import ROOT, TINY, assert_usage_error, read_metrics, run, train, train_ddp


def test_quick_recipe_reaches_90_percent(tmp_path):
    out = tmp_path / "r1"
    r = train("--recipe", "recipes/mnist1d.yaml", "--output_dir", str(out), "--train.progress_bar=off")
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["best"]["val/accuracy"]["value"] >= 0.90
    plan = json.loads((out / "plan.json").read_text())
    steps, evals = read_metrics(out)
    # exactly one row per optimizer step, in order, each with its LR
    assert [row["step"] for row in steps] == list(range(1, plan["total_steps"] + 1))
    assert all(row["lr"] > 0 for row in steps)
    assert len(evals) == plan["num_epochs"]
    assert {"step", "epoch", "val/loss", "val/accuracy"} <= set(evals[0])
    # summary agrees with the metrics it summarises
    best = max(evals, key=lambda row: row["val/accuracy"])
    assert summary["best"]["val/accuracy"]["value"] == best["val/accuracy"]
    first_90 = next(row for row in evals if row["val/accuracy"] >= 0.9)
    assert summary["targets"]["reached"]["0.9"]["epoch"] == first_90["epoch"]
    # config.yaml is the resolved recipe and loads again as a recipe
    from launcher.config import load_config

    assert load_config(out / "config.yaml") == load_config(ROOT / "recipes" / "mnist1d.yaml", {"train.progress_bar": "off"})
    assert "best val/accuracy" in r.stdout


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--recipe", "recipes/mnist1d.yaml", "--optim.lr=-1"], ["optim.lr", "positive"]),
        (["--recipe", "recipes/mnist1d.yaml", "--optim.lrr=0.1"], ["optim.lrr", "did you mean optim.lr?"]),
        (["--recipe", "recipes/mnist1d.yaml", "--train.num_epochs=abc"], ["train.num_epochs", "integer"]),
        (["--recipe", "missing.yaml"], ["recipe file not found", "missing.yaml"]),
        ([], ["--recipe is required"]),
        (["--recipe", "recipes/mnist1d.yaml", "--task.name=nope"], ["task.name", "unknown task"]),
        (["--recipe", "recipes/mnist1d.yaml", "--task.model=rnn"], ["task.model", "cnn"]),
        (["--recipe", "recipes/mnist1d.yaml", "--task.options.num_trian=5"], ["task.options.num_trian", "num_train"]),
        (["--recipe", "recipes/mnist1d.yaml", "--train.batch_size=5000"], ["train.batch_size", "lower"]),
    ],
)
def test_user_errors_exit_2_and_write_nothing(tmp_path, args, fragments):
    args = [a if not a.startswith("recipes/") else str(ROOT / a) for a in args]
    r = train(*args, cwd=tmp_path)
    assert_usage_error(r, *fragments)
    assert not (tmp_path / "runs").exists()


def test_existing_run_dir_is_never_overwritten(tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "metrics.jsonl").write_text("precious\n")
    r = train("--recipe", "recipes/mnist1d.yaml", "--output_dir", str(out), *TINY)
    assert_usage_error(r, "already exists", "--resume auto")
    assert (out / "metrics.jsonl").read_text() == "precious\n"
    assert sorted(p.name for p in out.iterdir()) == ["metrics.jsonl"]


def test_default_run_dir_and_print_config(tmp_path):
    r = train("--recipe", str(ROOT / "recipes/mnist1d.yaml"), "--print_config", "--optim.lr=0.007", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert yaml.safe_load(r.stdout)["optim"]["lr"] == 0.007
    assert not (tmp_path / "runs").exists()
    r = train("--recipe", str(ROOT / "recipes/mnist1d.yaml"), *TINY, "--train.num_epochs=1", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert run_dir.name.startswith("mnist1d-")
    assert {"config.yaml", "plan.json", "metrics.jsonl", "summary.json"} <= {p.name for p in run_dir.iterdir()}


def test_help_is_fast_and_light():
    code = "import sys, launcher.train; bad = [m for m in ('torch', 'wandb', 'deepspeed', 'accelerate') if m in sys.modules]; print(bad)"
    r = run([sys.executable, "-c", code])
    assert r.stdout.strip() == "[]", r.stdout + r.stderr
    r = train("--help", timeout=60)
    assert r.returncode == 0 and "recipe" in (r.stdout + r.stderr)


def test_out_of_tree_task_plugin(tmp_path):
    (tmp_path / "my_tasks.py").write_text(textwrap.dedent('''
        import torch
        from torch import nn
        import torch.nn.functional as F
        from launcher.data import TensorBatchDataset
        from launcher.tasks import Task, check_options

        def build(task, data):
            opts = check_options("blobs", task.options, {"n": 256})
            with open("builds.log", "a") as f:  # how many times the launcher builds the task
                f.write("built\\n")
            g = torch.Generator().manual_seed(0)
            centers = torch.randn(3, 8, generator=g) * 3
            y = torch.randint(0, 3, (opts["n"],), generator=g)
            x = centers[y] + torch.randn(opts["n"], 8, generator=g)
            split = opts["n"] * 3 // 4
            return Task(
                model=nn.Linear(8, 3),
                train_set=TensorBatchDataset(x[:split], y[:split]),
                val_set=TensorBatchDataset(x[split:], y[split:]),
                loss=lambda out, t: F.cross_entropy(out, t),
                metrics=lambda out, t: {"loss": F.cross_entropy(out, t, reduction="none"),
                                        "accuracy": (out.argmax(-1) == t).float()},
                collate_fn=TensorBatchDataset.collate,
                description="three gaussian blobs",
            )
    '''))
    recipe = tmp_path / "blobs.yaml"
    recipe.write_text("# blobs\ntask:\n  name: my_tasks:build\n  options:\n    n: 512\noptim:\n  lr: 0.05\n"
                      "train:\n  num_epochs: 5\n  batch_size: 16\nschedule:\n  plateau:\n    enabled: true\n")
    r = train("--recipe", str(recipe), "--output_dir", str(tmp_path / "out"), "--train.progress_bar=off", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "three gaussian blobs" in r.stdout
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["best"]["val/accuracy"]["value"] > 0.9
    # The plateau metric is checked against the task's metrics before the run starts; the task built
    # for that check is the one that trains.
    assert (tmp_path / "builds.log").read_text() == "built\n"
    r = train("--recipe", str(recipe), "--task.options.m=3", cwd=tmp_path)
    assert_usage_error(r, "task.options.m")
    r = train("--recipe", str(recipe), "--task.name=missing_mod:build", cwd=tmp_path)
    assert_usage_error(r, "cannot import module 'missing_mod'")


def test_run_lrs_equal_the_preview_step_for_step(tmp_path):
    """mnist1d_fast with plateau effectively off: metrics.jsonl LRs == `launcher.schedule --json`."""
    common = ["--recipe", "recipes/mnist1d_fast.yaml", "--schedule.plateau.patience=100000", "--train.num_epochs=5"]
    out = tmp_path / "fast"
    r = train(*common, "--output_dir", str(out), "--train.progress_bar=off", "--checkpoint.enabled=false")
    assert r.returncode == 0, r.stderr[-2000:]
    p = run([sys.executable, "-m", "launcher.schedule", *common, "--json"])
    assert p.returncode == 0, p.stderr
    preview = json.loads(p.stdout)["steps"]
    steps, _ = read_metrics(out)
    assert len(steps) == len(preview) == 5 * 125
    assert [row["lr"] for row in steps] == preview  # exact: same code, same floats
    assert steps[3 * 125 - 1]["lr"] == 5e-3  # warmup ends exactly at the end of epoch 3


@pytest.mark.slow
def test_two_processes_apply_the_same_lrs_as_one(tmp_path):
    """2 gloo processes x batch 16 vs 1 process x batch 32: same LR every step, plateau cuts on the same
    epoch on both ranks (recorded by each rank itself)."""
    common = ["--recipe", "recipes/mnist1d_fast.yaml", *TINY, "--train.num_epochs=6", "--schedule.warmup_epochs=1",
              "--schedule.plateau.patience=0", "--schedule.plateau.cooldown=0",
              "--schedule.plateau.threshold=0.3", "--checkpoint.enabled=false"]
    one, two = tmp_path / "one", tmp_path / "two"
    logs1, logs2 = tmp_path / "ranks1", tmp_path / "ranks2"
    logs1.mkdir()
    logs2.mkdir()
    r1 = train(*common, "--train.batch_size=32", "--output_dir", str(one), LAUNCHER_RANK_LOG_DIR=str(logs1))
    assert r1.returncode == 0, r1.stderr[-2000:]
    r2 = train_ddp(*common, "--train.batch_size=16", "--output_dir", str(two), LAUNCHER_RANK_LOG_DIR=str(logs2))
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert "2 process(es)" in r2.stdout
    s1, _ = read_metrics(one)
    s2, _ = read_metrics(two)
    assert len(s1) == len(s2) == 6 * 16
    assert [row["lr"] for row in s1] == pytest.approx([row["lr"] for row in s2], rel=1e-12)
    rank0 = [json.loads(x) for x in (logs2 / "rank0.jsonl").read_text().splitlines()]
    rank1 = [json.loads(x) for x in (logs2 / "rank1.jsonl").read_text().splitlines()]
    assert rank0 == rank1  # same LR and the same plateau state after every epoch
    single = [json.loads(x) for x in (logs1 / "rank0.jsonl").read_text().splitlines()]
    assert [row["plateau"]["num_reductions"] for row in rank0] == [row["plateau"]["num_reductions"] for row in single]
    assert rank0[-1]["plateau"]["num_reductions"] >= 1  # the test really exercised a plateau cut


def test_resume_from_a_checkpoint_path_continues_its_run(tmp_path):
    args = ["--recipe", str(ROOT / "recipes/mnist1d.yaml"), "--task.model=mlp", *TINY, "--train.num_epochs=2",
            "--checkpoint.every_n_steps=5"]
    run_dir = tmp_path / "run"
    killed = train(*args, "--output_dir", str(run_dir), LAUNCHER_TEST_KILL_AT_STEP="12")
    assert killed.returncode != 0
    checkpoint = run_dir / "checkpoints" / "step_00000010"
    assert checkpoint.is_dir()
    r = train(*args, "--resume", str(checkpoint), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert not (tmp_path / "runs").exists()  # continued the checkpoint's run, no new directory
    summary = json.loads((run_dir / "summary.json").read_text())
    steps, _ = read_metrics(run_dir)
    assert summary["status"] == "completed"
    assert [row["step"] for row in steps] == list(range(1, summary["final_step"] + 1))
