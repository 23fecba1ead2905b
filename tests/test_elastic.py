"""Resume on another number of processes (same global batch): 1 -> 2 and 2 -> 1 gloo processes.

mnist1d_fast (warmup, per-step decay, plateau) on 512 samples, global batch 32 (1 x 32 or 2 x 16),
4 epochs of 16 steps, a checkpoint every 5 steps; killed right after step 23 and resumed with
`--resume auto` from step 20 on the other process count. The LR column and the step count equal
the uninterrupted 1-process run's; `train/loss` and `val/loss` agree within float rounding (2 x 16
sums the gradients in another order than 1 x 32). Resumed with the command that started the run, on
another process count, the per-device batch follows the checkpoint's global batch.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import TINY, assert_usage_error, read_metrics, train, train_ddp

BASE = ["--recipe", "recipes/mnist1d_fast.yaml", *TINY, "--train.num_epochs=4", "--checkpoint.every_n_steps=5"]
ONE = [*BASE, "--train.batch_size=32"]
TWO = [*BASE, "--train.batch_size=16"]

pytestmark = pytest.mark.timeout(900)


def rows(run_dir: Path) -> tuple[list, list]:
    return read_metrics(run_dir)


def assert_follows(run_dir: Path, ref: Path) -> float:
    """Same steps and LR column as `ref`, losses within 1e-4 relative; returns the largest relative difference."""
    (steps, evals), (ref_steps, ref_evals) = rows(run_dir), rows(ref)
    assert [r["step"] for r in steps] == [r["step"] for r in ref_steps] == list(range(1, 65))
    assert [r["lr"] for r in steps] == pytest.approx([r["lr"] for r in ref_steps], rel=1e-12)
    assert [r["step"] for r in evals] == [r["step"] for r in ref_evals] == [16, 32, 48, 64]
    worst = 0.0
    for a, b in zip(steps + evals, ref_steps + ref_evals):
        for key in ("train/loss", "val/loss"):
            if key in b:
                worst = max(worst, abs(a[key] - b[key]) / abs(b[key]))
    assert worst < 1e-4
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["final_step"] == 64
    return worst


def test_resume_on_another_process_count_keeps_the_run(tmp_path):
    ref = tmp_path / "ref"
    assert train(*ONE, "--output_dir", str(ref)).returncode == 0

    # 1 process x 32 -> 2 processes x 16
    one = tmp_path / "one-to-two"
    killed = train(*ONE, "--output_dir", str(one), LAUNCHER_TEST_KILL_AT_STEP="23")
    assert killed.returncode == -9, killed.stderr[-3000:]
    resumed = train_ddp(*TWO, "--output_dir", str(one), "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (f"resumed from {one / 'checkpoints' / 'step_00000020'}: step 20, epoch 1 + 4 steps; "
            "1 -> 2 process(es), global batch 32 kept") in resumed.stdout
    print(f"1 -> 2: max relative loss difference {assert_follows(one, ref):.2e}")

    # 2 processes x 16 -> 1 process, the same command (a requeue on a smaller allocation): the
    # per-device batch follows the checkpoint's global batch by itself.
    two = tmp_path / "two-to-one"
    killed = train_ddp(*TWO, "--output_dir", str(two), LAUNCHER_TEST_KILL_AT_STEP="23")
    assert killed.returncode != 0
    resumed = train(*TWO, "--output_dir", str(two), "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert ("resume: 1 process(es) instead of 2: train.batch_size 16 -> 32 per device keeps the checkpoint's "
            "global batch of 32") in resumed.stdout
    assert "2 -> 1 process(es), global batch 32 kept" in resumed.stdout
    assert json.loads((two / "plan.json").read_text())["per_device_batch"] == 32
    print(f"2 -> 1: max relative loss difference {assert_follows(two, ref):.2e}")

    # Another global batch is refused with the settings that would keep it; nothing is written.
    before = {p: p.read_bytes() for p in one.rglob("*") if p.is_file()}
    refused = train(*BASE, "--train.batch_size=8", "--output_dir", str(one), "--resume", "auto")
    assert_usage_error(refused, "step_00000064 was trained with a global batch of 32 (2 process(es) x 16 x 1 "
                       "accumulation); this run has 1 x 8 x 1 = 8: keep it with --train.grad_accum_steps=4 or "
                       "--train.batch_size=32 --train.grad_accum_steps=1")
    assert {p: p.read_bytes() for p in one.rglob("*") if p.is_file()} == before



def test_new_global_batch_is_refused_then_continued_with_the_flag(tmp_path):
    """1 x 32 killed after step 23 (checkpoint at 20 = epoch 1 + 4 steps = sample 128), continued at 1 x 64:
    epoch 1 goes on at sample 128 (step 2 of 8 in the new plan), and the LR follows the 64-sample plan
    from its step 10 on, while `step` keeps counting updates (21, 22, ...)."""
    ref = tmp_path / "ref64"
    assert train(*BASE, "--train.batch_size=64", "--output_dir", str(ref)).returncode == 0
    run_dir = tmp_path / "run"
    killed = train(*ONE, "--output_dir", str(run_dir), LAUNCHER_TEST_KILL_AT_STEP="23")
    assert killed.returncode == -9, killed.stderr[-3000:]

    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    refused = train(*BASE, "--train.batch_size=64", "--output_dir", str(run_dir), "--resume", "auto")
    assert_usage_error(refused, "global batch of 32", "this run has 1 x 64 x 1 = 64: keep it with "
                       "--train.batch_size=32 --train.grad_accum_steps=1, or pass --new_global_batch to continue with 64")
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before

    resumed = train(*BASE, "--train.batch_size=64", "--output_dir", str(run_dir), "--resume", "auto",
                    "--new_global_batch")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert ("global batch 32 -> 64: epoch 1 continues at sample 128, the schedule at step 10 of 32"
            in resumed.stdout), resumed.stdout
    steps, evals = read_metrics(run_dir)
    assert [r["step"] for r in steps] == list(range(1, 43))  # 20 of 32 samples, then 22 of 64
    assert [r["step"] for r in evals] == [16, 26, 34, 42] and evals[-1]["epoch"] == 4
    ref_steps, _ = read_metrics(ref)
    assert [r["lr"] for r in steps[20:]] == pytest.approx([r["lr"] for r in ref_steps[10:]], rel=1e-12)
    assert json.loads((run_dir / "plan.json").read_text())["global_batch"] == 64
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["final_step"] == 42


@pytest.mark.slow
def test_deepspeed_zero2_resumes_on_its_own_process_count_and_refuses_another(tmp_path):
    """ZeRO-2 optimizer state is partitioned per process: 2 -> 1 is refused (the error line, training
    processes exit 2, nothing written); 2 -> 2 continues bit for bit."""
    pytest.importorskip("deepspeed")
    pytest.importorskip("transformers")
    from helpers import ACCELERATE, EXITS_ENV, assert_usage_exits, recording_exits, run

    args = [*BASE, "--train.num_epochs=2", "--train.batch_size=8", "--train.grad_accum_steps=2"]

    def launch(*extra: str, num_processes: int = 2, **env: str):
        return run([*ACCELERATE, "--config_file", "accelerate_configs/cpu_deepspeed_zero2.yaml", "--num_processes",
                    str(num_processes), *recording_exits("launcher.train"), *args, *extra], timeout=900, **env)

    ref, run_dir = tmp_path / "ref", tmp_path / "run"
    assert launch("--output_dir", str(ref)).returncode == 0
    assert launch("--output_dir", str(run_dir), LAUNCHER_TEST_KILL_AT_STEP="13").returncode != 0
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    refused = launch("--output_dir", str(run_dir), "--resume", "auto", num_processes=1,
                     **{EXITS_ENV: str(tmp_path / "exits")})
    assert refused.returncode != 0
    assert_usage_exits(tmp_path / "exits")
    assert ("error: --resume: step_00000010 holds DEEPSPEED state sharded over 2 process(es) and cannot be "
            "resharded to this run's 1 (DEEPSPEED); resume it with 2 process(es)") in refused.stderr
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before
    resumed = launch("--output_dir", str(run_dir), "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {run_dir / 'checkpoints' / 'step_00000010'}:" in resumed.stdout
    (steps, evals), (ref_steps, ref_evals) = rows(run_dir), rows(ref)
    assert [(r["step"], r["lr"], r["train/loss"]) for r in steps] == \
        [(r["step"], r["lr"], r["train/loss"]) for r in ref_steps]
    assert [(r["step"], r["val/loss"]) for r in evals] == [(r["step"], r["val/loss"]) for r in ref_evals]
