"""Exact resume after a SIGKILL: final weights and metrics equal an uninterrupted run's.

The kills are deterministic: LAUNCHER_TEST_KILL_AT_STEP makes the process SIGKILL itself right
after an optimizer step, LAUNCHER_TEST_KILL_IN_SAVE while a checkpoint is half written.
The run: MNIST-1D MLP on ~512 samples, batch 32 (about 16 steps per epoch; read from plan.json),
3 epochs, a step checkpoint every 5 steps plus one after each epoch's evaluation.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from helpers import TINY, read_metrics, train

BASE = ["--recipe", "recipes/mnist1d.yaml", "--task.model=mlp", *TINY, "--train.num_epochs=3",
        "--checkpoint.every_n_steps=5", "--checkpoint.keep_last=2"]

pytestmark = pytest.mark.timeout(300)


def reference(tmp_path_factory) -> Path:
    """The uninterrupted single-process run, shared by the test files of one pytest session."""
    path = tmp_path_factory.getbasetemp() / "reference-uninterrupted"
    if not (path / "summary.json").exists():
        shutil.rmtree(path, ignore_errors=True)
        result = train(*BASE, "--output_dir", str(path))
        assert result.returncode == 0, result.stderr[-3000:]
    return path


def plan(run_dir: Path) -> dict:
    return json.loads((run_dir / "plan.json").read_text())


def newest_checkpoint(run_dir: Path) -> Path:
    from launcher.checkpoint import latest

    ckpt = latest(str(run_dir / "checkpoints"))
    assert ckpt is not None, f"no complete checkpoint in {run_dir}"
    return Path(ckpt.path)


def final_weights(run_dir: Path) -> dict:
    """Model weights of the newest checkpoint (the end of training), DDP's `module.` prefix removed."""
    from safetensors.torch import load_file

    ckpt = newest_checkpoint(run_dir)
    assert ckpt.name == f"step_{plan(run_dir)['total_steps']:08d}"
    return {k.removeprefix("module."): v for k, v in load_file(str(ckpt / "model.safetensors")).items()}


def columns(run_dir: Path) -> tuple[list, list]:
    """(step, lr, train/loss) per optimizer step and (step, val/loss) per evaluation."""
    steps, evals = read_metrics(run_dir)
    return ([(r["step"], r["lr"], r["train/loss"]) for r in steps], [(r["step"], r["val/loss"]) for r in evals])


def assert_same_run(resumed: Path, ref: Path, exact: bool = True) -> None:
    a, b = final_weights(resumed), final_weights(ref)
    assert a.keys() == b.keys()
    for name in a:
        if exact:
            assert a[name].equal(b[name]), name
        else:
            assert (a[name] - b[name]).abs().max().item() < 1e-5, name
    (steps_a, evals_a), (steps_b, evals_b) = columns(resumed), columns(ref)
    p = plan(ref)
    assert [s[0] for s in steps_a] == list(range(1, p["total_steps"] + 1))  # no duplicate or missing rows
    assert [e[0] for e in evals_a] == [e[0] for e in evals_b] == [p["steps_per_epoch"] * e for e in (1, 2, 3)]
    if exact:
        assert steps_a == steps_b
        assert evals_a == evals_b
    else:
        assert [s[1] for s in steps_a] == pytest.approx([s[1] for s in steps_b], rel=1e-12)
        assert [s[2] for s in steps_a] == pytest.approx([s[2] for s in steps_b], rel=1e-5)
        assert [e[1] for e in evals_a] == pytest.approx([e[1] for e in evals_b], rel=1e-5)


def test_sigkill_at_several_steps_then_resume_auto_is_bitwise_exact(tmp_path, tmp_path_factory):
    ref = reference(tmp_path_factory)
    spe = plan(ref)["steps_per_epoch"]
    run = tmp_path / "run"
    out = ["--output_dir", str(run)]
    # step 7: mid epoch 1 (resumes from step 5); spe + 1: the first step of epoch 2 (resumes from the
    # post-evaluation checkpoint at spe); 2 * spe: the last step of epoch 2, before its evaluation
    # (resumes mid epoch 2 from the last multiple of 5).
    first = train(*BASE, *out, LAUNCHER_TEST_KILL_AT_STEP="7")
    assert first.returncode == -9, first.stderr[-2000:]
    config = (run / "config.yaml").read_bytes()
    for kill_at, resumed_from in ((spe + 1, 5), (2 * spe, spe), (None, (2 * spe - 1) // 5 * 5)):
        extra = {"LAUNCHER_TEST_KILL_AT_STEP": str(kill_at)} if kill_at else {}
        result = train(*BASE, *out, "--resume", "auto", **extra)
        assert result.returncode == (-9 if kill_at else 0), result.stderr[-3000:]
        assert f"resumed from {run / 'checkpoints' / f'step_{resumed_from:08d}'}:" in result.stdout
    assert (run / "config.yaml").read_bytes() == config
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["final_step"] == plan(ref)["total_steps"]
    assert_same_run(run, ref)


def test_kill_while_saving_keeps_the_previous_checkpoint(tmp_path, tmp_path_factory):
    ref = reference(tmp_path_factory)
    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    killed = train(*BASE, "--output_dir", str(run), LAUNCHER_TEST_KILL_IN_SAVE="10")
    assert killed.returncode == -9
    assert (ckpts / ".tmp-step_00000010" / "model.safetensors").exists()  # died half-way through
    assert not (ckpts / "step_00000010").exists()
    # Two more ways a folder can be unusable: no manifest (copied half-way), a file of the wrong size.
    shutil.copytree(ckpts / "step_00000005", ckpts / "step_00000012")
    (ckpts / "step_00000012" / "COMPLETE").unlink()
    shutil.copytree(ckpts / "step_00000005", ckpts / "step_00000011")
    with open(ckpts / "step_00000011" / "model.safetensors", "r+b") as f:
        f.truncate(100)

    result = train(*BASE, "--output_dir", str(run), "--resume", "auto")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"skipping checkpoint {ckpts / 'step_00000012'}: no COMPLETE manifest" in result.stderr
    assert f"skipping checkpoint {ckpts / 'step_00000011'}: model.safetensors has 100 bytes" in result.stderr
    assert f"resumed from {ckpts / 'step_00000005'}:" in result.stdout
    assert not (ckpts / ".tmp-step_00000010").exists()  # the next save cleared the leftover
    assert_same_run(run, ref)
