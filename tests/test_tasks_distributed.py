"""cifar10 and gpt through the real CLI with 2 gloo processes, at tiny sizes."""

from __future__ import annotations

import io
import json
import math
import pickle
import tarfile

import numpy as np
import pytest

from launcher.tasks import cifar10 as c10

from helpers import read_metrics, train_ddp


def write_cifar_archive(root, per_batch: int = 32, seed: int = 0) -> None:
    """A small archive in the official python format (5 train batches + test batch)."""
    rng = np.random.default_rng(seed)
    with tarfile.open(root / c10.ARCHIVE, "w:gz") as tar:
        for name in (*c10.TRAIN_BATCHES, c10.TEST_BATCH):
            labels = rng.integers(0, 10, per_batch)
            # class-dependent brightness so a tiny model can learn something
            data = (rng.integers(0, 64, (per_batch, 3072)) + labels[:, None] * 19).astype(np.uint8)
            raw = pickle.dumps({b"labels": [int(v) for v in labels], b"data": data}, protocol=2)
            info = tarfile.TarInfo(f"{c10.FOLDER}/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))


@pytest.mark.slow
def test_cifar10_two_processes(tmp_path):
    write_cifar_archive(tmp_path)
    out = tmp_path / "run"
    r = train_ddp("--recipe", "recipes/cifar10_resnet18.yaml", "--output_dir", str(out), f"--data.root={tmp_path}",
                  "--task.model=resnet_tiny", "--train.batch_size=8", "--train.num_epochs=2",
                  "--train.mixed_precision=no", "--train.compile=false", "--train.channels_last=false",
                  "--schedule.warmup_epochs=0", "--schedule.warmup_steps=2", "--checkpoint.enabled=false",
                  "--train.progress_bar=off")
    assert r.returncode == 0, r.stderr[-3000:]
    plan = json.loads((out / "plan.json").read_text())
    assert plan["num_processes"] == 2 and plan["global_batch"] == 16
    assert plan["steps_per_epoch"] == 160 // 16
    steps, evals = read_metrics(out)
    assert len(steps) == 2 * 10 and len(evals) == 2
    assert all(math.isfinite(row["train/loss"]) for row in steps)
    # The classes differ in brightness: two epochs learn them well above a constant guess (about 0.1),
    # and the accuracy counts each of the 32 validation images once across both processes.
    accuracy = evals[-1]["val/accuracy"]
    assert accuracy > 0.25 and (accuracy * 32).is_integer(), evals


@pytest.mark.slow
def test_gpt_two_processes_reports_tokens(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 400)
    out = tmp_path / "run"
    r = train_ddp("--recipe", "recipes/gpt_tiny.yaml", "--output_dir", str(out), f"--task.options.text_file={text}",
                  "--task.options.n_layer=1", "--task.options.n_embd=32", "--task.options.n_head=2",
                  "--task.options.block_size=32", "--task.options.samples_per_epoch=256",
                  "--task.options.val_samples=32", "--train.batch_size=8", "--train.num_epochs=2",
                  "--schedule.warmup_steps=2", "--checkpoint.enabled=false", "--train.peak_tflops=1",
                  "--train.progress_bar=off")
    assert r.returncode == 0, r.stderr[-3000:]
    steps, evals = read_metrics(out)
    assert len(steps) == 2 * (256 // 16)
    last = evals[-1]
    assert last["val/perplexity"] == pytest.approx(math.exp(last["val/loss"]), rel=1e-6)
    assert last["throughput/tokens_per_sec"] == pytest.approx(last["throughput/samples_per_sec"] * 32)
    assert 0 < last["throughput/mfu"] < 1  # against the 1 TFLOP/s peak given on the command line
    assert evals[-1]["val/loss"] < evals[0]["val/loss"]  # a repetitive text is learnt quickly
