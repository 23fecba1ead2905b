"""Preemption: SIGUSR1 / SIGTERM -> checkpoint, exit 124, exact resume.

LAUNCHER_TEST_PAUSE_AT_STEP holds a process after a given step until a signal arrives (it writes
`<run_dir>/.paused-rank<R>` with its pid), so the signal lands at a known step without any timing.
One process checkpoints the step in flight when the signal arrives (the next one); several agree at
the next flush, within train.log_every_n_steps steps.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_resume import BASE, assert_same_run, newest_checkpoint, plan, reference

from helpers import (
    ACCELERATE,
    CPU_DDP,
    EXITS_ENV,
    read_metrics,
    recording_exits,
    run,
    start,
    train,
    worker_exits,
)

pytestmark = pytest.mark.timeout(300)


def wait_for_pause(proc: subprocess.Popen, marker: Path) -> int:
    """The pid written by the paused rank (fails if the run ends without pausing)."""
    while True:
        if marker.exists() and marker.read_text().strip():
            return int(marker.read_text())
        if proc.poll() is not None:
            _, err = proc.communicate()
            raise AssertionError(f"the run ended (status {proc.returncode}) without pausing:\n{err[-3000:]}")
        time.sleep(0.05)


def test_sigusr1_checkpoints_the_step_in_flight_and_exits_124(tmp_path, tmp_path_factory):
    ref = reference(tmp_path_factory)
    last = plan(ref)["steps_per_epoch"]  # the signal comes before the last step of epoch 1: the hardest
    run_dir = tmp_path / "run"            # place, a checkpoint after that step but before the evaluation
    hook_out = tmp_path / "hook.txt"
    proc = start([sys.executable, "-m", "launcher.train", *BASE, "--output_dir", str(run_dir)],
                 LAUNCHER_TEST_PAUSE_AT_STEP=str(last - 1),
                 LAUNCHER_ON_PREEMPT=f'echo "$LAUNCHER_CHECKPOINT" > {hook_out}')
    pid = wait_for_pause(proc, run_dir / ".paused-rank0")
    assert pid == proc.pid
    # Keep signalling (USR1 and TERM) until the process exits: many arrive while the checkpoint is
    # being written and must change nothing.
    sent = 0
    while proc.poll() is None:
        os.kill(pid, (signal.SIGUSR1, signal.SIGTERM)[sent % 2])
        sent += 1
        time.sleep(0.005)
    out, err = proc.communicate()
    assert proc.returncode == 124, err[-3000:]
    assert sent > 1
    ckpt = newest_checkpoint(run_dir)
    assert ckpt.name == f"step_{last:08d}"  # step last - 1 was done when the signal came; `last` was in flight
    assert f"preempted (SIGUSR1) at step {last}" in out and "resume with --resume auto" in out
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "preempted"
    steps, _ = read_metrics(run_dir)
    assert steps[-1]["step"] == last  # every finished step is on disk
    assert hook_out.read_text().strip() == str(ckpt)

    resumed = train(*BASE, "--output_dir", str(run_dir), "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {ckpt}:" in resumed.stdout
    assert_same_run(run_dir, ref)


def test_two_processes_sigkill_then_sigterm_on_one_rank_then_resume(tmp_path, tmp_path_factory):
    """2 gloo processes (batch 16 each = the reference's 32): kill, resume, preempt one rank, resume."""
    ref = reference(tmp_path_factory)
    run_dir = tmp_path / "run"
    launch = [*ACCELERATE, "--config_file", CPU_DDP, *recording_exits("launcher.train"),
              *BASE, "--train.batch_size=16", "--output_dir", str(run_dir)]
    killed = run(launch, timeout=240, LAUNCHER_TEST_KILL_AT_STEP="7")
    assert killed.returncode != 0
    assert newest_checkpoint(run_dir).name == "step_00000005"

    # Only rank 1 gets SIGTERM after step 21; rank 0 learns of it at the next flush (here the step-25
    # checkpoint: every 5 steps), through the all-reduce that reads the rows back, so neither hangs
    # and no step pays for a collective of its own. The bound: within train.log_every_n_steps steps.
    exits = tmp_path / "exits"
    proc = start([*launch, "--resume", "auto"], LAUNCHER_TEST_PAUSE_AT_STEP="21:1", **{EXITS_ENV: str(exits)})
    pid = wait_for_pause(proc, run_dir / ".paused-rank1")
    os.kill(pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=240)
    # Both workers exit 124 themselves; accelerate launch (torch elastic) reports a failure (status 1).
    assert proc.returncode != 0
    assert worker_exits(exits) == {0: 124, 1: 124}, err[-3000:]
    assert "preempted (signal to another process) at step 25" in out  # the main process only heard of it
    assert newest_checkpoint(run_dir).name == "step_00000025"
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "preempted"

    resumed = run([*launch, "--resume", "auto"], timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {run_dir / 'checkpoints' / 'step_00000025'}:" in resumed.stdout
    # 2 x 16 sums the gradients in another order than 1 x 32: equal within float rounding.
    assert_same_run(run_dir, ref, exact=False)
