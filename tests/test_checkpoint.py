"""Checkpoint files, completeness, rotation and compatibility checks."""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from launcher.checkpoint import (
    MARKER,
    RESUME_MAY_CHANGE,
    Checkpointer,
    compat_defaults,
    compat_values,
    inspect,
    latest,
    param_shapes,
    rng_state,
    select_kept,
    set_rng_state,
)
from launcher.config import CheckpointConfig, PlateauConfig, affects_training
from launcher.errors import UsageError

from helpers import TINY, assert_usage_error, read_metrics, run, train

# ---------------------------------------------------------------------------------------------
# Rotation
# ---------------------------------------------------------------------------------------------


def test_select_kept_table():
    entries = [(4, None), (8, None), (10, 0.9), (12, None), (16, None), (20, 0.7), (24, None), (30, 0.8)]
    assert select_kept(entries, keep_last=2, best_mode="min") == {24, 30, 20}
    assert select_kept(entries, keep_last=2, best_mode="max") == {24, 30, 10}
    assert select_kept(entries, keep_last=3, best_mode=None) == {20, 24, 30}
    assert select_kept([(5, 0.5), (10, 0.5), (15, None)], keep_last=1, best_mode="min") == {5, 15}  # first reached


@given(st.dictionaries(st.integers(1, 10_000), st.one_of(st.none(), st.floats(-1e6, 1e6)), max_size=30),
       st.integers(1, 5), st.sampled_from(["min", "max", None]))
def test_select_kept_keeps_the_last_k_and_the_best(metrics, keep_last, mode):
    entries = list(metrics.items())
    kept = select_kept(entries, keep_last, mode)
    steps = sorted(metrics)
    assert set(steps[-keep_last:]) <= kept <= set(steps)
    scored = {s: v for s, v in metrics.items() if v is not None}
    if mode and scored:
        best = (min if mode == "min" else max)(scored.values())
        assert any(scored.get(s) == best for s in kept)
        assert len(kept) <= keep_last + 1
    else:
        assert len(kept) == min(keep_last, len(steps))


# ---------------------------------------------------------------------------------------------
# Files: RNG, completeness, compatibility
# ---------------------------------------------------------------------------------------------


def test_rng_state_round_trips_through_weights_only_load(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    torch.save(rng_state(), tmp_path / "rng.pt")
    first = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(7)
    np.random.seed(7)
    torch.manual_seed(7)
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert first[:2] == again[:2] and first[2].equal(again[2])


def fake_checkpoint(folder: Path, step: int, world_size: int = 1, compat: dict | None = None,
                    shapes: dict | None = None, complete: bool = True, distributed_type: str = "NO") -> Path:
    path = folder / f"step_{step:08d}"
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(b"x" * 64)
    meta = {"format_version": 1, "step": step, "epoch": 1, "reason": "step", "metrics": {}, "world_size": world_size,
            "distributed_type": distributed_type, "compat": compat or {}, "param_shapes": shapes or {}}
    (path / "meta.json").write_text(json.dumps(meta))
    if complete:
        files = {name: os.path.getsize(path / name) for name in ("model.safetensors", "meta.json")}
        (path / MARKER).write_text(json.dumps({"format_version": 1, "step": step, "files": files}))
    return path


def test_incomplete_or_damaged_checkpoints_are_skipped(tmp_path):
    good = fake_checkpoint(tmp_path, 5)
    fake_checkpoint(tmp_path, 10, complete=False)
    damaged = fake_checkpoint(tmp_path, 15)
    (damaged / "model.safetensors").write_bytes(b"x" * 10)
    (tmp_path / ".tmp-step_00000020").mkdir()  # a save in progress or killed: not even looked at
    warnings: list[str] = []
    assert latest(str(tmp_path), warn=warnings.append).path == str(good)
    assert warnings == [f"skipping checkpoint {damaged}: model.safetensors has 10 bytes, the manifest says 64",
                        f"skipping checkpoint {tmp_path / 'step_00000010'}: no COMPLETE manifest "
                        "(interrupted while being written)"]
    assert inspect(str(good))[1] is None
    assert latest(str(tmp_path / "nothing")) is None


def checkpointer(run_dir: Path, model: torch.nn.Module, compat: dict, num_processes: int = 1) -> Checkpointer:
    acc = SimpleNamespace(num_processes=num_processes, is_main_process=True, process_index=0,
                          distributed_type="DistributedType.MULTI_CPU" if num_processes > 1 else "DistributedType.NO")
    return Checkpointer(CheckpointConfig(), str(run_dir), acc, model, compat)


def test_compatibility_check_says_what_differs(tmp_path):
    model = torch.nn.Linear(4, 3)
    shapes = {"weight": [3, 4], "bias": [3]}
    compat = {"optim.lr": 0.005, "train.batch_size": 32}
    path = str(fake_checkpoint(tmp_path / "checkpoints", 5, compat=compat, shapes=shapes))
    assert checkpointer(tmp_path, model, compat).check_compatible(path)["step"] == 5

    # Another process count resumes when the global batch is kept (per-device batch x processes x accumulation).
    two = checkpointer(tmp_path, model, {"optim.lr": 0.005, "train.batch_size": 16}, num_processes=2)
    assert two.check_compatible(path)["step"] == 5 and two.elastic == "1 -> 2 process(es), global batch 32 kept"
    with pytest.raises(UsageError, match=r"global batch of 32 \(1 process\(es\) x 32 x 1 accumulation\); this run "
                                         r"has 2 x 32 x 1 = 64: keep it with --train.batch_size=16 --train.grad_acc"):
        checkpointer(tmp_path, model, compat, num_processes=2).check_compatible(path)
    with pytest.raises(UsageError, match=r"on 3 processes: use a process count that divides it \(e.g. 2, 4\), or "
                                         r"pass --new_global_batch to continue with 96"):
        checkpointer(tmp_path, model, compat, num_processes=3).check_compatible(path)
    sharded = str(fake_checkpoint(tmp_path / "ds", 5, world_size=2, compat={**compat, "train.batch_size": 16},
                                  shapes=shapes, distributed_type="DEEPSPEED"))
    with pytest.raises(UsageError, match=r"holds DeepSpeed state and this run uses replicated \(one process or DDP\): "
                                         r"resume it with the accelerate config that wrote it"):
        checkpointer(tmp_path, model, compat).check_compatible(sharded)
    with pytest.raises(UsageError, match=r"optim\.lr 0\.005 -> 0\.01\)"):
        checkpointer(tmp_path, model, {"optim.lr": 0.01, "train.batch_size": 32}).check_compatible(path)
    with pytest.raises(UsageError, match=r"weight \[3, 4\] -> \[5, 4\]"):
        checkpointer(tmp_path, torch.nn.Linear(4, 5), compat).check_compatible(path)


def test_a_key_added_after_the_checkpoint_matches_its_default(tmp_path):
    """A checkpoint written before a recipe key existed resumes when the run keeps that key's default."""
    model = torch.nn.Linear(4, 3)
    shapes = {"weight": [3, 4], "bias": [3]}
    saved = {"optim.lr": 0.005, "train.batch_size": 32}
    path = str(fake_checkpoint(tmp_path / "checkpoints", 5, compat=saved, shapes=shapes))
    assert compat_defaults()["schedule.plateau.patience"] == PlateauConfig().patience
    now = {**saved, "schedule.plateau.patience": PlateauConfig().patience}
    assert checkpointer(tmp_path, model, now).check_compatible(path)["step"] == 5
    with pytest.raises(UsageError, match=r"schedule\.plateau\.patience 3 -> 99"):
        checkpointer(tmp_path, model, {**saved, "schedule.plateau.patience": 99}).check_compatible(path)


def test_resume_checks_the_keys_compare_groups_by():
    """One source: the keys a resume must keep are those that change what a run learns (compare groups by
    them too), except the precision, which may follow the hardware, and plus the data size."""
    from launcher.compare import _matters
    from launcher.config import Config, flatten, to_dict

    cfg = Config()
    keys = set(compat_values(cfg, 100))
    assert keys == {k for k in flatten(to_dict(cfg)) if affects_training(k)} - set(RESUME_MAY_CHANGE) | {
        "data.num_train_samples"}
    assert {k for k in keys if k != "data.num_train_samples"} == {
        k for k in flatten(to_dict(cfg)) if _matters(k) or k == "train.seed"} - set(RESUME_MAY_CHANGE)
    assert "optim.lr" in keys and "train.seed" in keys and "checkpoint.keep_last" not in keys


def test_param_shapes_look_through_wrappers():
    wrapped = torch.nn.Module()  # how DDP and the DeepSpeed engine hold the model
    wrapped.module = torch.nn.Linear(4, 3)
    compiled = torch.nn.Module()  # how torch.compile holds it
    compiled._orig_mod = wrapped
    assert param_shapes(compiled) == {"weight": [3, 4], "bias": [3]}


# ---------------------------------------------------------------------------------------------
# A real run: layout, rotation, weights-only loading, the listing CLI, refused resumes
# ---------------------------------------------------------------------------------------------

RUN_ARGS = ["--recipe", "recipes/mnist1d.yaml", "--task.model=mlp", *TINY, "--train.num_epochs=3",
            "--checkpoint.every_n_steps=4", "--checkpoint.keep_last=2",
            # the *lowest* accuracy as "best": that is an early epoch, so rotation must keep an old folder
            "--checkpoint.best_metric=val/accuracy", "--checkpoint.best_mode=min"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "run"
    result = train(*RUN_ARGS, "--output_dir", str(path))
    assert result.returncode == 0, result.stderr[-3000:]
    return path


def test_rotation_keeps_the_last_two_and_the_best(run_dir):
    _, evals = read_metrics(run_dir)
    total = json.loads((run_dir / "plan.json").read_text())["total_steps"]
    worst = min(evals, key=lambda r: (r["val/accuracy"], r["step"]))["step"]
    ckpts = run_dir / "checkpoints"
    names = sorted(p.name for p in ckpts.iterdir())
    expected = {total, total - total % 4 if total % 4 else total - 4, worst}
    assert names == [f"step_{s:08d}" for s in sorted(expected)]
    assert worst < min(s for s in expected if s != worst)


def test_checkpoint_contents_load_weights_only(run_dir):
    from safetensors.torch import load_file

    total = json.loads((run_dir / "plan.json").read_text())["total_steps"]
    ckpt = run_dir / "checkpoints" / f"step_{total:08d}"
    assert inspect(str(ckpt))[1] is None
    weights = load_file(str(ckpt / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())
    optimizer = torch.load(ckpt / "optimizer.bin", weights_only=True)
    assert optimizer["state"] and len(optimizer["param_groups"]) >= 1
    rng = torch.load(ckpt / "rng_0.pt", weights_only=True)
    assert set(rng) >= {"python", "numpy", "torch"}
    state = json.loads((ckpt / "state.json").read_text())
    assert state["train_state"]["step"] == total and state["train_state"]["step_in_epoch"] == 0
    assert "num_steps" not in state["scheduler"]  # the position is the trainer's step (one counter)
    assert set(state["scheduler"]["plateau"]) >= {"best", "num_bad_epochs", "cooldown_counter", "factor"}
    assert state["summary"]["best"]
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["world_size"] == 1 and meta["reason"] == "epoch" and "val/loss" in meta["metrics"]
    assert meta["compat"]["optim.lr"] == 0.02 and meta["compat"]["task.model"] == "mlp"
    assert meta["param_shapes"] == {k: list(v.shape) for k, v in weights.items()}
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".tmp-")]


def test_listing_cli_marks_what_resume_auto_picks(run_dir):
    result = run([sys.executable, "-m", "launcher.checkpoint", str(run_dir)], timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    total = json.loads((run_dir / "plan.json").read_text())["total_steps"]
    assert lines[0].startswith(f"step_{total:08d}") and lines[0].endswith("<- --resume auto")
    assert len(lines) == 3


def snapshot(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def test_resume_with_changed_recipe_values_is_refused_and_writes_nothing(run_dir):
    before = snapshot(run_dir)
    result = train(*RUN_ARGS, "--optim.lr=0.01", "--output_dir", str(run_dir), "--resume", "auto")
    assert_usage_error(result, "optim.lr 0.02 -> 0.01", "config.yaml")
    assert snapshot(run_dir) == before


def test_resume_from_an_incomplete_checkpoint_path_is_refused(run_dir, tmp_path):
    broken = tmp_path / "step_00000003"
    broken.mkdir()
    result = train(*RUN_ARGS, "--output_dir", str(tmp_path / "new"), "--resume", str(broken))
    assert_usage_error(result, "step_00000003", "no COMPLETE manifest")
    assert not (tmp_path / "new").exists()


# ---------------------------------------------------------------------------------------------
# Content hashes: fallback to the previous intact checkpoint, refusal, the verify command
# ---------------------------------------------------------------------------------------------


def flip_a_byte(path: Path) -> None:
    """Alter one byte in the middle of a file, keeping its size (a size check cannot see it)."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_an_altered_file_is_caught_by_its_hash_and_resume_falls_back(run_dir, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    ckpts = sorted((copy / "checkpoints").iterdir())
    newest, previous = ckpts[-1], ckpts[-2]
    manifest = json.loads((newest / MARKER).read_text())
    assert set(manifest["sha256"]) == set(manifest["files"]) and "model.safetensors" in manifest["sha256"]
    flip_a_byte(newest / "model.safetensors")
    assert inspect(str(newest), verify=False)[1] is None  # same size
    assert inspect(str(newest))[1] == "model.safetensors does not match its SHA-256 in the manifest (altered or corrupt)"

    verify = run([sys.executable, "-m", "launcher.checkpoint", "verify", str(copy)], timeout=120)
    assert verify.returncode == 1, verify.stderr
    lines = verify.stdout.splitlines()
    assert lines[0] == f"{newest.name}  DAMAGED: model.safetensors does not match its SHA-256 in the manifest " \
                       "(altered or corrupt)"
    assert lines[1].startswith(f"{previous.name}  ok  ") and lines[1].endswith("sha256 verified  <- --resume auto")
    assert lines[-1] == f"1 of {len(ckpts)} checkpoint(s) damaged; --resume auto takes {previous.name}"
    intact = run([sys.executable, "-m", "launcher.checkpoint", "verify", str(run_dir)], timeout=120)
    assert intact.returncode == 0 and "DAMAGED" not in intact.stdout

    result = train(*RUN_ARGS, "--output_dir", str(copy), "--resume", "auto")
    assert result.returncode == 0, result.stderr[-3000:]
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: skipping checkpoint")]
    assert warnings == [f"warning: skipping checkpoint {newest}: model.safetensors does not match its SHA-256 "
                        "in the manifest (altered or corrupt)"]
    assert f"resumed from {previous}:" in result.stdout
    assert inspect(str(newest))[1] is None  # written again by the resumed run


def test_resume_auto_refuses_a_run_whose_checkpoints_are_all_damaged(run_dir, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    ckpts = sorted((copy / "checkpoints").iterdir())
    for ckpt in ckpts:
        flip_a_byte(ckpt / "optimizer.bin")
    before = snapshot(copy)
    result = train(*RUN_ARGS, "--output_dir", str(copy), "--resume", "auto")
    assert_usage_error(result, f"none of the {len(ckpts)} checkpoint(s)", f"{ckpts[-1].name}: optimizer.bin does not "
                       "match its SHA-256", "nothing was changed", "launcher.checkpoint verify")
    assert snapshot(copy) == before


def test_listing_and_verifying_checkpoints_needs_no_torch():
    """The manifest code (launcher.checkpoint_files) is plain file-system code."""
    code = "import sys, launcher.checkpoint_files; print('torch' in sys.modules)"
    proc = run([sys.executable, "-c", code])
    assert proc.stdout.strip() == "False", proc.stderr


def test_export_writes_the_checkpoints_weights_as_one_file_and_refuses_to_overwrite(run_dir, tmp_path):
    """`launcher.checkpoint export`: the newest intact checkpoint's model as safetensors, loadable into the
    task's model as it is; an existing file and a damaged checkpoint are refused (exit 2), nothing written."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from launcher.config import load_config
    from launcher.tasks import build_task

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    total = json.loads((copy / "plan.json").read_text())["total_steps"]
    newest = copy / "checkpoints" / f"step_{total:08d}"
    result = run([sys.executable, "-m", "launcher.checkpoint", "export", str(copy)], timeout=120)
    assert result.returncode == 0, result.stderr
    out = copy / f"model-step_{total:08d}.safetensors"
    assert result.stdout.startswith(f"wrote {out}: ")
    exported = load_file(str(out))
    assert {k: v.tolist() for k, v in exported.items()} == \
        {k: v.tolist() for k, v in load_file(str(newest / "model.safetensors")).items()}
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["step"] == str(total)
    cfg = load_config(str(copy / "config.yaml"), {})
    build_task(cfg.task, cfg.data).model.load_state_dict(exported)  # strict: the task model's own names

    again = run([sys.executable, "-m", "launcher.checkpoint", "export", str(copy)], timeout=120)
    assert_usage_error(again, f"export: {out} already exists; pass --output with a new file name")
    assert load_file(str(out)).keys() == exported.keys()

    flip_a_byte(newest / "model.safetensors")
    damaged = run([sys.executable, "-m", "launcher.checkpoint", "export", str(newest), "--output",
                   str(tmp_path / "m.safetensors")], timeout=120)
    assert_usage_error(damaged, f"export: {newest} is not an intact checkpoint (model.safetensors does not match its "
                       "SHA-256")
    assert not (tmp_path / "m.safetensors").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".export-")]


def test_init_from_starts_a_new_run_from_the_weights_of_a_checkpoint_or_a_file(run_dir, tmp_path):
    """`train.init_from` = a run directory (its newest intact checkpoint) or an exported file: the new run
    starts from exactly those weights, with its own optimizer, schedule and steps. Weights of another
    model and a missing path are refused before anything is written (exit 2)."""
    from safetensors.torch import load_file

    total = json.loads((run_dir / "plan.json").read_text())["total_steps"]
    saved = load_file(str(run_dir / "checkpoints" / f"step_{total:08d}" / "model.safetensors"))
    exported = tmp_path / "weights.safetensors"
    assert run([sys.executable, "-m", "launcher.checkpoint", "export", str(run_dir), "--output",
                str(exported)], timeout=120).returncode == 0
    args = [*RUN_ARGS[:RUN_ARGS.index("--train.num_epochs=3")], "--train.num_epochs=2", "--checkpoint.enabled=false"]
    for source in (run_dir, exported):
        out, dump = tmp_path / f"from-{source.name}", tmp_path / f"dump-{source.name}"
        dump.mkdir()
        result = train(*args, f"--train.init_from={source}", "--output_dir", str(out),
                       LAUNCHER_DEBUG_WEIGHTS_DIR=str(dump))
        assert result.returncode == 0, result.stderr[-3000:]
        assert f"init_from: {len(saved)} tensors from {source}" in result.stdout
        start = torch.load(dump / "start-rank0.pt", weights_only=True)
        assert {k: v.tolist() for k, v in start.items()} == {k: v.tolist() for k, v in saved.items()}
        steps, _ = read_metrics(out)
        assert steps[0]["step"] == 1 and len(steps) == 2 * total // 3  # a new run: its own steps from 1

    wrong = train(*args, "--task.model=cnn", f"--train.init_from={exported}", "--output_dir", str(tmp_path / "cnn"))
    assert_usage_error(wrong, f"train.init_from: the weights in {exported} do not fit this run's model: ",
                       "use weights of the same task.model and task.options")
    missing = train(*args, "--train.init_from=nowhere.safetensors", "--output_dir", str(tmp_path / "none"))
    assert_usage_error(missing, "train.init_from: 'nowhere.safetensors' not found")
    assert not (tmp_path / "cnn").exists() and not (tmp_path / "none").exists()
