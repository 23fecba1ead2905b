"""Non-finite loss injected on one rank: every rank skips or stops together, nothing bad is checkpointed.

LAUNCHER_INJECT_NONFINITE="STEP[:RANK],..." (tests/faults.py) makes the loss NaN at those optimizer
steps on that rank. With DDP the NaN reaches every rank's reduced gradients, so every rank sees the
same non-finite gradient norm and skips the update on the device, with no collective of its own; a
hang or a divergence (one rank stepping, one not) would show up as a timeout or unequal weights.
A skipped update still advances the schedule: the LR column equals the preview at every step.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from launcher.checkpoint import inspect
from launcher.config import load_config
from launcher.schedule import preview

from helpers import TINY, read_metrics, train, train_ddp, worker_exits

pytestmark = pytest.mark.timeout(240)

ARGS = ["--recipe", "recipes/mnist1d.yaml", "--task.model=mlp", *TINY, "--train.num_epochs=2",
        "--checkpoint.every_n_steps=1", "--checkpoint.keep_last=100"]


def weights(run: Path, step: int) -> dict:
    return load_file(str(run / "checkpoints" / f"step_{step:08d}" / "model.safetensors"))


def previewed_lrs(run: Path) -> list[float]:
    """The LR of every step as `launcher.schedule` previews it for this run's recipe and plan."""
    cfg = load_config(run / "config.yaml")
    plan = json.loads((run / "plan.json").read_text())
    return preview(cfg.schedule, plan["base_lr"], plan["warmup_steps"], plan["steps_per_epoch"],
                   plan["total_steps"])["steps"]


def checkpoint_steps(run: Path) -> list[int]:
    return sorted(int(p.name.removeprefix("step_")) for p in (run / "checkpoints").glob("step_*"))


def test_two_processes_skip_then_stop_after_max_consecutive_skips(tmp_path):
    run = tmp_path / "run"
    result = train_ddp(*ARGS, "--train.batch_size=16", "--train.on_nonfinite=skip", "--train.max_nonfinite_skips=2",
                       "--output_dir", str(run), timeout=200, exits_to=tmp_path / "exits",
                       LAUNCHER_INJECT_NONFINITE="5:1,9-10:1")
    assert "step 5: non-finite loss on 1 of 2 process(es): step skipped" in result.stderr
    assert "step 9: non-finite loss on 1 of 2 process(es): step skipped" in result.stderr
    assert "step 10: non-finite loss on 1 of 2 process(es): stopping (2 consecutive skips" in result.stderr
    assert result.returncode != 0
    assert worker_exits(tmp_path / "exits") == {0: 3, 1: 3}, result.stderr[-3000:]  # both workers stopped
    assert json.loads((run / "summary.json").read_text())["status"] == "nonfinite"

    # A skipped step leaves the weights alone (bitwise, on both ranks); the next step trains again.
    for a, b in ((4, 5), (8, 9)):
        wa, wb = weights(run, a), weights(run, b)
        assert all(wa[k].equal(wb[k]) for k in wa), (a, b)
    w5, w6 = weights(run, 5), weights(run, 6)
    assert not all(w5[k].equal(w6[k]) for k in w5)
    steps = {r["step"]: r for r in read_metrics(run)[0]}
    assert steps[5]["train/loss"] is None and steps[6]["train/loss"] is not None
    # The schedule advanced through the skipped steps: every logged LR is the previewed one.
    lrs = previewed_lrs(run)
    assert [r["lr"] for r in steps.values()] == lrs[:len(steps)]
    assert steps[6]["lr"] != steps[5]["lr"] != steps[4]["lr"]
    assert max(steps) == 10
    # Nothing after the last good step was checkpointed, and that checkpoint is complete.
    assert checkpoint_steps(run)[-1] == 9
    assert inspect(str(run / "checkpoints" / "step_00000009"))[0] is not None


def test_two_processes_stop_on_first_nonfinite(tmp_path):
    run = tmp_path / "run"
    result = train_ddp(*ARGS, "--train.batch_size=16", "--output_dir", str(run), timeout=200,
                       exits_to=tmp_path / "exits", LAUNCHER_INJECT_NONFINITE="6:0")
    assert "step 6: non-finite loss on 1 of 2 process(es): stopping (train.on_nonfinite=stop)" in result.stderr
    assert "the last checkpoint" in result.stderr and "step_00000005) is intact" in result.stderr
    assert result.returncode != 0
    assert worker_exits(tmp_path / "exits") == {0: 3, 1: 3}, result.stderr[-3000:]
    assert checkpoint_steps(run)[-1] == 5
    assert max(r["step"] for r in read_metrics(run)[0]) == 6


def test_single_process_stop_exits_3_and_resume_continues(tmp_path):
    run = tmp_path / "run"
    stopped = train(*ARGS, "--output_dir", str(run), LAUNCHER_INJECT_NONFINITE="3")
    assert stopped.returncode == 3, stopped.stderr[-3000:]
    assert "step 3: non-finite loss on 1 of 1 process(es): stopping" in stopped.stderr
    assert checkpoint_steps(run) == [1, 2]
    resumed = train(*ARGS, "--output_dir", str(run), "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    steps = [r["step"] for r in read_metrics(run)[0]]
    assert steps == sorted(set(steps)) and steps[:4] == [1, 2, 3, 4]  # step 3 redone once, not duplicated


def test_cosine_with_skipped_steps_still_ends_exactly_at_min_lr(tmp_path):
    """One step counter: skipped updates do not shift the schedule, so cosine reaches min_lr at the end."""
    run = tmp_path / "run"
    result = train("--recipe", "recipes/mnist1d.yaml", "--task.model=mlp", *TINY, "--train.max_steps=32",
                   "--schedule.decay=cosine", "--schedule.min_lr=0.001", "--schedule.warmup_steps=0",
                   "--schedule.warmup_epochs=0", "--schedule.plateau.enabled=false", "--train.on_nonfinite=skip",
                   "--checkpoint.enabled=false", "--output_dir", str(run), LAUNCHER_INJECT_NONFINITE="3-6")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("step skipped") == 4
    summary = json.loads((run / "summary.json").read_text())
    assert summary["final_step"] == 32 and summary["final_lr"] == 0.001
    steps, _ = read_metrics(run)
    assert [r["lr"] for r in steps] == previewed_lrs(run)
