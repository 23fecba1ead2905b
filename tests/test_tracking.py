"""Tracking: metrics.jsonl always; W&B (offline here, read back from its own files) and TensorBoard when enabled."""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.compare import load_runs, read_wandb_offline, read_wandb_records
from launcher.config import TrackingConfig, WandbConfig
from launcher.sinks import resolve_wandb_mode
from launcher.tracking import Tracker, summary_values

from helpers import ROOT

SECRET = "some-fake-secret"
TINY = {"train.num_epochs": 2, "task.options.num_train": 256, "task.options.num_test": 128,
        "train.progress_bar": "off", "checkpoint.enabled": False}


@pytest.fixture
def offline_env(monkeypatch, tmp_path):
    """W&B offline with a fake key; its global settings and caches inside the test's tmp dir."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_DIR", raising=False)


def wandb_cfg(**kw) -> TrackingConfig:
    return TrackingConfig(wandb=WandbConfig(enabled=True, **kw))


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_training_logs_every_lr_to_wandb_offline_and_never_the_key(offline_env, tmp_path, capfd):
    import torch

    from launcher.train import main

    torch.set_num_threads(1)
    run_dir = tmp_path / "run"
    main(recipe=str(ROOT / "recipes/mnist1d.yaml"), output_dir=str(run_dir),
         **{**TINY, "tracking.wandb.enabled": True, "tracking.wandb.group": "g1", "tracking.tensorboard": True})
    out, err = capfd.readouterr()

    local = rows_of(run_dir / "metrics.jsonl")
    plan = json.loads((run_dir / "plan.json").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    [run] = load_runs(str(run_dir / "wandb"))

    local_train = [r for r in local if "lr" in r]
    wandb_train = [r for r in run.rows if "lr" in r]
    assert [r["step"] for r in local_train] == list(range(1, plan["total_steps"] + 1))
    assert [r["step"] for r in wandb_train] == [r["step"] for r in local_train]
    for mine, theirs in zip(local_train, wandb_train):
        for key in ("lr", "lr/group0", "lr/group1", "train/loss", "train/grad_norm"):
            assert theirs[key] == pytest.approx(mine[key], rel=1e-12), (mine["step"], key)
    local_val = [r for r in local if "val/accuracy" in r]
    assert [(r["step"], r["val/accuracy"]) for r in run.rows if "val/accuracy" in r] == [
        (r["step"], r["val/accuracy"]) for r in local_val]

    assert run.config["optim.lr"] == 2e-2 and run.config["train.num_epochs"] == 2
    assert run.config["tracking.wandb.group"] == "g1"
    assert run.config["plan.total_steps"] == plan["total_steps"]
    assert run.summary["best/val/accuracy"] == pytest.approx(summary["best"]["val/accuracy"]["value"])
    assert run.summary["final_lr"] == pytest.approx(summary["final_lr"])
    assert run.summary["target_metric"] == "val/accuracy"
    assert any((run_dir / "tensorboard").iterdir())

    assert "wandb sync" in err and "offline" in err
    assert SECRET not in out + err
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


def test_wandb_failure_is_a_warning_and_metrics_jsonl_goes_on(offline_env, tmp_path, monkeypatch):
    import wandb

    tracker = Tracker(str(tmp_path), wandb_cfg())
    tracker.log_config({"optim": {"lr": 0.1}}, {"global_batch": 32})

    def broken(*args, **kwargs):
        raise RuntimeError("W&B service went away")

    monkeypatch.setattr(wandb.sdk.wandb_run.Run, "log", broken)
    with pytest.warns(RuntimeWarning, match="W&B: log failed .*service went away.*metrics.jsonl continues"):
        for step in range(1, 4):
            tracker.log({"step": step, "lr": 0.1 * step})
            tracker.flush()
    with pytest.warns(RuntimeWarning, match="switched off"):
        for step in range(4, 16):
            tracker.log({"step": step, "lr": 0.1 * step})
            tracker.flush()
    tracker.set_summary({"final_lr": 1.5})
    tracker.close()
    assert [r["step"] for r in rows_of(tmp_path / "metrics.jsonl")] == list(range(1, 16))


def test_wandb_start_failure_is_a_warning(offline_env, tmp_path, monkeypatch):
    import wandb

    def broken_init(**kwargs):
        raise OSError("cannot start the W&B service")

    monkeypatch.setattr(wandb, "init", broken_init)
    tracker = Tracker(str(tmp_path), wandb_cfg())
    with pytest.warns(RuntimeWarning) as caught:
        tracker.log_config({"optim": {"lr": 0.1}}, {})
    messages = [str(w.message) for w in caught]
    assert any("W&B: start failed" in m and "cannot start" in m for m in messages), messages
    assert any("W&B: switched off" in m for m in messages), messages
    tracker.log({"step": 1, "lr": 0.1})
    tracker.close()
    assert rows_of(tmp_path / "metrics.jsonl") == [{"step": 1, "lr": 0.1}]


def run_ids_in(folder: Path) -> list[str]:
    ids = []
    for f in folder.glob("wandb/offline-run-*/run-*.wandb"):
        ids += [r.run.run_id for r in read_wandb_records(f) if r.WhichOneof("record_type") == "run"]
    return ids


def test_run_id_is_exposed_and_accepted_back_on_resume(offline_env, tmp_path):
    first = Tracker(str(tmp_path), wandb_cfg(mode="offline"))
    first.log_config({}, {})
    for step in range(1, 6):
        first.log({"step": step, "lr": 0.1 * step})
    first.close()
    assert len(first.run_id) == 8
    assert run_ids_in(tmp_path) == [first.run_id]

    # W&B names an offline folder by its start second and the run id: a resume within the same second
    # would reuse the folder. Date the first segment a second earlier, as a real (later) resume sees it.
    [segment] = tmp_path.glob("wandb/offline-run-*")
    stamp, run_id = segment.name.removeprefix("offline-run-").split("-", 1)
    earlier = datetime.datetime.strptime(stamp, "%Y%m%d_%H%M%S") - datetime.timedelta(seconds=1)
    segment.rename(segment.with_name(f"offline-run-{earlier:%Y%m%d_%H%M%S}-{run_id}"))
    # Resume from a checkpoint at step 3: the same W&B run continues, and the new offline segment
    # holds the whole history again (a killed process may have lost what W&B had not written).
    resumed = Tracker(str(tmp_path), wandb_cfg(mode="offline"), resume_run_id=first.run_id, truncate_after_step=3)
    assert resumed.run_id == first.run_id
    resumed.log_config({}, {})
    for step in range(4, 8):
        resumed.log({"step": step, "lr": 1.0 + step})
    resumed.close()
    assert run_ids_in(tmp_path) == [first.run_id, first.run_id]
    newest = sorted(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))[-1]
    expected = [0.1, 0.2, 0.30000000000000004, 5.0, 6.0, 7.0, 8.0]
    assert [r["lr"] for r in read_wandb_offline([newest]).rows] == expected
    [merged] = load_runs(str(tmp_path))  # metrics.jsonl
    assert [r["lr"] for r in merged.rows] == expected
    [merged] = load_runs(str(tmp_path / "wandb"))  # both offline segments, read in order
    assert [r["step"] for r in merged.rows] == list(range(1, 8))


def test_no_key_means_offline_with_a_sync_hint(monkeypatch, tmp_path, capfd):
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_DISABLED", "WANDB_SILENT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("NETRC", str(tmp_path / "missing-netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    assert resolve_wandb_mode("")[0] == "offline"
    assert resolve_wandb_mode("disabled")[0] == "disabled"
    tracker = Tracker(str(tmp_path), wandb_cfg())
    tracker.log_config({}, {})
    tracker.close()
    ours = [line for line in capfd.readouterr().err.splitlines() if line.startswith("W&B:")]
    assert len(ours) == 1
    assert "no W&B API key" in ours[0] and "wandb sync " + str(tmp_path / "wandb" / "offline-run-") in ours[0]


def test_failed_online_start_falls_back_offline_in_one_line(offline_env, monkeypatch, tmp_path, capfd):
    monkeypatch.delenv("WANDB_MODE")  # a key is set, so the mode resolves to online; W&B rejects the fake key
    tracker = Tracker(str(tmp_path), wandb_cfg())
    tracker.log_config({}, {})
    tracker.log({"step": 1, "lr": 0.1})
    tracker.close()
    ours = [line for line in capfd.readouterr().err.splitlines() if line.startswith("W&B:")]
    assert len(ours) == 1 and "online start failed" in ours[0] and "wandb sync" in ours[0], ours
    assert SECRET not in ours[0]
    assert run_ids_in(tmp_path) == [tracker.run_id]


def test_wandb_mode_disabled_writes_no_wandb_files(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    tracker = Tracker(str(tmp_path), wandb_cfg())
    tracker.log_config({}, {})
    tracker.log({"step": 1, "lr": 0.1})
    tracker.close()
    assert tracker.run_id is None
    assert sorted(os.listdir(tmp_path)) == ["metrics.jsonl"]


def test_tensorboard_scalars_use_the_optimizer_step(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tracker = Tracker(str(tmp_path), TrackingConfig(tensorboard=True))
    tracker.log_config({"optim": {"lr": 0.1}}, {"global_batch": 8})
    for step in (1, 2, 3):
        tracker.log({"step": step, "epoch": step / 3, "lr": 0.1 * step, "train/loss": 1.0 / step})
    tracker.log({"step": 3, "epoch": 1, "val/accuracy": 0.5})
    tracker.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, round(e.value, 6)) for e in events.Scalars("lr")] == [(1, 0.1), (2, 0.2), (3, 0.3)]
    assert [(e.step, e.value) for e in events.Scalars("val/accuracy")] == [(3, 0.5)]


def test_truncate_after_step_drops_redone_rows(tmp_path):
    tracker = Tracker(str(tmp_path))
    for step in range(1, 6):
        tracker.log({"step": step, "lr": 0.1})
    tracker.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "lr"')  # torn by a kill
    Tracker(str(tmp_path), truncate_after_step=3).close()
    assert [r["step"] for r in rows_of(tmp_path / "metrics.jsonl")] == [1, 2, 3]


def test_background_flushes_keep_order_and_a_waiting_flush_writes_everything(tmp_path):
    tracker = Tracker(str(tmp_path))
    for step in range(1, 101):
        tracker.log({"step": step, "train/loss": float("nan") if step == 50 else 1.0 / step})
        if step % 7 == 0:
            tracker.flush(wait=False)  # handed to the writer thread
    tracker.flush()  # returns once every row handed over before is on disk: what a checkpoint needs
    rows = rows_of(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 101))
    assert rows[49]["train/loss"] is None and rows[98]["train/loss"] == 1.0 / 99
    tracker.close()


def test_a_writer_thread_error_is_raised_by_the_next_flush(tmp_path):
    tracker = Tracker(str(tmp_path))
    real = tracker._file

    class Full:
        def write(self, text):
            raise OSError(28, "No space left on device")

        def flush(self):
            pass

        def close(self):
            pass

    tracker._file = Full()
    tracker.log({"step": 1})
    tracker.flush(wait=False)
    with pytest.raises(RuntimeError, match=r"writing .*metrics.jsonl failed: .*No space left on device"):
        tracker.flush()
    tracker.log({"step": 2})
    tracker.flush(wait=False)
    with pytest.raises(RuntimeError, match="No space left on device"):
        tracker.close()  # the error again, and still everything released
    assert tracker._writer is None
    real.close()


def test_summary_values_flatten_summary_json():
    summary = {"final_lr": 0.001, "wall_seconds": 12.5, "status": "completed",
               "final": {"val/accuracy": 0.9}, "best": {"val/accuracy": {"value": 0.92, "epoch": 7, "step": 70}},
               "targets": {"metric": "val/accuracy",
                           "reached": {"0.5": {"epoch": 2, "step": 20, "seconds": 3.0}, "0.95": None}}}
    values = summary_values(summary)
    assert values["best/val/accuracy"] == 0.92 and values["best/val/accuracy/epoch"] == 7
    assert values["final/val/accuracy"] == 0.9 and values["final_lr"] == 0.001
    assert (values["epochs_to/0.5"], values["steps_to/0.5"], values["seconds_to/0.5"]) == (2, 20, 3.0)
    assert "epochs_to/0.95" not in values


@pytest.mark.parametrize("module", ["launcher.train", "launcher.compare"])
def test_help_imports_neither_torch_nor_wandb(module):
    code = (f"import sys; sys.argv = ['{module}', '--help']\n"
            f"import {module} as m\n"
            "try:\n    m.cli()\nexcept SystemExit:\n    pass\n"
            "print('HEAVY', sorted(x for x in ('torch', 'wandb', 'matplotlib') if x in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PAGER": "cat"})
    assert "HEAVY []" in proc.stdout, proc.stdout + proc.stderr
    assert "usage" in proc.stdout.lower() and "recipe" in proc.stdout
