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

from helpers import TINY, assert_usage_error, read_metrics, train, train_ddp, train_fsdp

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


def exported(run_dir: Path) -> dict:
    """The model weights of the run's newest checkpoint, through `launcher.checkpoint export`."""
    import sys

    from safetensors.torch import load_file

    from helpers import run

    out = run_dir.parent / f"{run_dir.name}.safetensors"
    result = run([sys.executable, "-m", "launcher.checkpoint", "export", str(run_dir), "--output", str(out)])
    assert result.returncode == 0, result.stderr[-3000:]
    return load_file(str(out))


def assert_weights_close(a: dict, b: dict) -> None:
    import torch

    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)


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


def test_fsdp_sharded_state_resumes_on_another_process_count_through_dcp(tmp_path):
    """FSDP2 with SHARDED_STATE_DICT (tests/fsdp_cpu.py: Accelerate's FSDP on gloo processes): the
    checkpoint is DCP shards, one file per rank. Killed after step 23 on 2 processes x 16, it resumes
    from step 20 on 1 process, with the command that started it (DCP reads the 2 shards into the one
    process's whole tensors), and the run follows the uninterrupted 1-process (non-FSDP) run within
    float rounding; 1 x 32 -> 2 x 16 the same. On the same process count it continues bit for bit."""
    import shutil

    ref, fsdp_ref = tmp_path / "ref", tmp_path / "fsdp-ref"
    assert train(*ONE, "--output_dir", str(ref)).returncode == 0
    done = train_fsdp(*TWO, "--output_dir", str(fsdp_ref))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "fsdp: version 2" in done.stdout
    print(f"FSDP 2 x 16 against 1 x 32: max relative loss difference {assert_follows(fsdp_ref, ref):.2e}")

    two, same = tmp_path / "two-to-one", tmp_path / "two-to-two"
    assert train_fsdp(*TWO, "--output_dir", str(two), LAUNCHER_TEST_KILL_AT_STEP="23").returncode != 0
    checkpoint = two / "checkpoints" / "step_00000020"
    assert sorted(p.name for p in (checkpoint / "pytorch_model_fsdp_0").iterdir()) == \
        [".metadata", "__0_0.distcp", "__1_0.distcp"]
    shutil.copytree(two, same)
    resumed = train_fsdp(*TWO, "--output_dir", str(two), "--resume", "auto", num_processes=1)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "train.batch_size 16 -> 32 per device keeps the checkpoint's global batch of 32" in resumed.stdout
    assert f"resumed from {checkpoint}: step 20, epoch 1 + 4 steps; 2 -> 1 process(es), global batch 32 kept" \
        in resumed.stdout
    print(f"FSDP 2 -> 1: max relative loss difference {assert_follows(two, ref):.2e}")

    one = tmp_path / "one-to-two"
    assert train_fsdp(*ONE, "--output_dir", str(one), num_processes=1, LAUNCHER_TEST_KILL_AT_STEP="23").returncode != 0
    resumed = train_fsdp(*ONE, "--output_dir", str(one), "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "1 -> 2 process(es), global batch 32 kept" in resumed.stdout
    print(f"FSDP 1 -> 2: max relative loss difference {assert_follows(one, ref):.2e}")

    resumed = train_fsdp(*TWO, "--output_dir", str(same), "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    keys = ("step", "lr", "train/loss", "val/loss")
    assert [[r.get(k) for k in keys] for part in rows(same) for r in part] == \
        [[r.get(k) for k in keys] for part in rows(fsdp_ref) for r in part]

    # The final weights, gathered from the DCP shards by `launcher.checkpoint export`.
    weights, fsdp = exported(ref), exported(fsdp_ref)
    for other in (fsdp, exported(two), exported(one)):
        assert_weights_close(other, weights)
    assert {k: v.tolist() for k, v in exported(same).items()} == {k: v.tolist() for k, v in fsdp.items()}


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_resumes_on_another_process_count_through_the_universal_format(tmp_path, stage):
    """ZeRO-2 partitions the optimizer state per process, ZeRO-3 the parameters too. 2 -> 1: the checkpoint is converted to
    DeepSpeed's universal format (a copy, removed after loading; the original is only read) and the
    run continues with the LR column of the uninterrupted run and losses within float rounding;
    2 -> 2 continues bit for bit. The 1-process resume is launched as the job was (batch 8 per device),
    as a requeue that lands on another allocation is: the engine gets the micro-batch that keeps the
    global batch. Another global batch is still refused, nothing written."""
    pytest.importorskip("deepspeed")
    pytest.importorskip("transformers")
    import shutil

    from helpers import ACCELERATE, EXITS_ENV, assert_usage_exits, recording_exits, run

    args = [*BASE, "--train.num_epochs=2", "--train.grad_accum_steps=2"]

    def launch(*extra: str, num_processes: int = 2, per_device: int | None = None, **env: str):
        batch = f"--train.batch_size={per_device or 16 // num_processes}"  # global batch 16 x 2 accumulation = 32
        return run([*ACCELERATE, "--config_file", f"accelerate_configs/cpu_deepspeed_zero{stage}.yaml", "--num_processes",
                    str(num_processes), *recording_exits("launcher.train"), *args, batch, *extra], timeout=900, **env)

    ref, run_dir, same = tmp_path / "ref", tmp_path / "run", tmp_path / "same"
    assert launch("--output_dir", str(ref)).returncode == 0
    assert launch("--output_dir", str(run_dir), LAUNCHER_TEST_KILL_AT_STEP="13").returncode != 0
    shutil.copytree(run_dir, same)
    checkpoint = run_dir / "checkpoints" / "step_00000010"
    before = {p: p.read_bytes() for p in checkpoint.rglob("*") if p.is_file()}

    refused = launch("--output_dir", str(run_dir), "--resume", "auto", "--train.grad_accum_steps=1", num_processes=1,
                     **{EXITS_ENV: str(tmp_path / "exits")})
    assert refused.returncode != 0
    assert_usage_exits(tmp_path / "exits")
    assert "step_00000010 was trained with a global batch of 32" in refused.stderr

    # keep_last: the checkpoint stays, to be compared with what it was before the resume.
    resumed = launch("--output_dir", str(run_dir), "--resume", "auto", "--checkpoint.keep_last=100", num_processes=1,
                     per_device=8)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "train.batch_size 8 -> 16 per device keeps the checkpoint's global batch of 32" in resumed.stdout
    assert (f"resumed from {checkpoint}: step 10, epoch 0 + 10 steps; 2 -> 1 process(es), global batch 32 kept"
            in resumed.stdout), resumed.stdout
    assert {p: p.read_bytes() for p in checkpoint.rglob("*") if p.is_file()} == before
    assert not list((run_dir / "checkpoints").glob(".universal-*"))
    (steps, evals), (ref_steps, ref_evals) = rows(run_dir), rows(ref)
    assert [(r["step"], r["lr"]) for r in steps] == [(r["step"], r["lr"]) for r in ref_steps]
    assert [r["step"] for r in evals] == [r["step"] for r in ref_evals]
    worst = max(abs(a[k] - b[k]) / abs(b[k]) for a, b in zip(steps + evals, ref_steps + ref_evals)
                for k in ("train/loss", "val/loss") if k in b)
    assert worst < 1e-4
    print(f"DeepSpeed ZeRO-{stage} 2 -> 1: max relative loss difference {worst:.2e}")

    resumed = launch("--output_dir", str(same), "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    (steps, evals) = rows(same)
    assert [(r["step"], r["lr"], r["train/loss"]) for r in steps] == \
        [(r["step"], r["lr"], r["train/loss"]) for r in ref_steps]
    assert [(r["step"], r["val/loss"]) for r in evals] == [(r["step"], r["val/loss"]) for r in ref_evals]

    # The final weights, gathered from the ZeRO partitions by `launcher.checkpoint export`.
    weights = exported(ref)
    assert_weights_close(exported(run_dir), weights)
    assert {k: v.tolist() for k, v in exported(same).items()} == {k: v.tolist() for k, v in weights.items()}


@pytest.mark.parametrize(("kind", "stage", "refused"), [
    ("DEEPSPEED", 2, False), ("DEEPSPEED", 1, False), ("DEEPSPEED", 3, False), ("FSDP", "SHARDED_STATE_DICT", False),
    ("FSDP", "FULL_STATE_DICT", False), ("FSDP", "LOCAL_STATE_DICT", True), ("FSDP", None, True)])
def test_sharded_state_on_another_process_count_is_refused_unless_it_reshards(kind, stage, refused):
    """ZeRO-1/2/3 go through DeepSpeed's universal format and FSDP's DCP shards or whole files load on any
    count; FSDP's per-rank LOCAL_STATE_DICT and FSDP checkpoints that predate the recorded state dict type
    resume only on the count that wrote them."""
    from types import SimpleNamespace

    from launcher.errors import UsageError
    from launcher.resharding import check_world_size

    plugin = SimpleNamespace(zero_stage=stage) if kind == "DEEPSPEED" else None
    fsdp = SimpleNamespace(state_dict_type=SimpleNamespace(name=stage)) if kind == "FSDP" else None
    acc = SimpleNamespace(num_processes=1, distributed_type=kind,
                          state=SimpleNamespace(deepspeed_plugin=plugin, fsdp_plugin=fsdp))
    compat = {"train.batch_size": 16, "train.grad_accum_steps": 2}
    meta = {"world_size": 2, "distributed_type": kind, "compat": {**compat, "train.batch_size": 8}}
    if kind == "FSDP" and stage:
        meta["fsdp_state_dict_type"] = stage
    if refused:
        with pytest.raises(UsageError, match=f"step_00000010 holds {kind} state sharded over 2 process"):
            check_world_size("step_00000010", meta, compat, acc)
    else:
        assert check_world_size("step_00000010", meta, compat, acc) == "2 -> 1 process(es), global batch 32 kept"


def test_fsdp_state_saved_as_another_state_dict_type_is_refused():
    """Accelerate loads the files of this run's `fsdp_state_dict_type`: a checkpoint saved as the other
    one is refused with the setting that loads it, on any process count."""
    from types import SimpleNamespace

    from launcher.errors import UsageError
    from launcher.resharding import check_world_size

    fsdp = SimpleNamespace(state_dict_type=SimpleNamespace(name="SHARDED_STATE_DICT"))
    acc = SimpleNamespace(num_processes=2, distributed_type="FSDP", state=SimpleNamespace(fsdp_plugin=fsdp))
    compat = {"train.batch_size": 16, "train.grad_accum_steps": 1}
    meta = {"world_size": 2, "distributed_type": "FSDP", "fsdp_state_dict_type": "FULL_STATE_DICT", "compat": compat}
    with pytest.raises(UsageError, match="step_00000010 holds FSDP state saved as FULL_STATE_DICT, and this run's "
                       "accelerate config saves SHARDED_STATE_DICT: resume with fsdp_state_dict_type: FULL_STATE_DICT"):
        check_world_size("step_00000010", meta, compat, acc)
    assert check_world_size("step_00000010", {**meta, "fsdp_state_dict_type": "SHARDED_STATE_DICT"}, compat, acc) \
        is None


def test_deepspeed_state_of_another_zero_stage_is_refused_on_another_process_count():
    from types import SimpleNamespace

    from launcher.errors import UsageError
    from launcher.resharding import check_world_size

    acc = SimpleNamespace(num_processes=1, distributed_type="DEEPSPEED",
                          state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=3)))
    compat = {"train.batch_size": 16, "train.grad_accum_steps": 1}
    meta = {"world_size": 2, "distributed_type": "DEEPSPEED", "zero_stage": 2,
            "compat": {**compat, "train.batch_size": 8}}
    with pytest.raises(UsageError, match="step_00000010 holds DeepSpeed ZeRO-2 state and this run uses ZeRO-3"):
        check_world_size("step_00000010", meta, compat, acc)
    assert check_world_size("step_00000010", {**meta, "zero_stage": 3}, compat, acc) == \
        "2 -> 1 process(es), global batch 16 kept"


@pytest.mark.parametrize(("saved", "now", "engines"), [
    ("DEEPSPEED", "MULTI_CPU", "DeepSpeed state and this run uses replicated (one process or DDP)"),
    ("MULTI_GPU", "FSDP", "replicated (one process or DDP) state and this run uses FSDP"),
    ("FSDP", "DEEPSPEED", "FSDP state and this run uses DeepSpeed")])
def test_state_of_another_engine_is_refused_on_any_process_count(saved, now, engines):
    """Each engine loads only its own files (Accelerate would stop with a missing-file traceback)."""
    from types import SimpleNamespace

    from launcher.errors import UsageError
    from launcher.resharding import check_world_size

    state = SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=2) if now == "DEEPSPEED" else None,
                            fsdp_plugin=SimpleNamespace(state_dict_type=SimpleNamespace(name="SHARDED_STATE_DICT")))
    acc = SimpleNamespace(num_processes=2, distributed_type=now, state=state)
    compat = {"train.batch_size": 16, "train.grad_accum_steps": 1}
    meta = {"world_size": 2, "distributed_type": saved, "compat": compat}
    import re

    with pytest.raises(UsageError, match=re.escape(f"step_00000010 holds {engines}: resume it with the accelerate "
                                                   "config that wrote it")):
        check_world_size("step_00000010", meta, compat, acc)
