"""Scaling equivalence through the real launchers: same global batch, same training.

2 processes x batch 16 (`accelerate launch`, gloo), 1 process x batch 32, and 1 process x batch 16
x 2 accumulation steps see the same 32 samples in every optimizer step (launcher.data.EpochSampler),
so over 3 epochs they must log the same learning rate at every step and the same train/loss up to
float summation order, stated here as TRAIN_LOSS_RTOL (measured: 1.4e-7). The two ranks of the DDP
run must end with bitwise-identical weights, and exact evaluation on a validation set that does not
divide into world x batch (200 samples, 2 x 64) must equal the one-process value: the samples
Accelerate repeats to even out the last batch are not counted twice.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from helpers import ACCELERATE, read_metrics, run

pytestmark = pytest.mark.slow

NUM_TRAIN, NUM_TEST, VAL_BATCH_PER_DEVICE = 640, 200, 64
COMMON = ["--recipe", "recipes/mnist1d.yaml", f"--task.options.num_train={NUM_TRAIN}",
          f"--task.options.num_test={NUM_TEST}", "--train.num_epochs=3", "--checkpoint.enabled=false",
          f"--data.val_batch_size={VAL_BATCH_PER_DEVICE}"]
TRAIN_LOSS_RTOL = 1e-5
WEIGHTS_ATOL = 1e-5
VAL_RTOL = 1e-6


def _train(tmp: Path, name: str, launcher: list[str], *args: str) -> dict:
    run_dir, weights = tmp / name, tmp / f"{name}-weights"
    weights.mkdir()
    proc = run([*launcher, "-m", "launcher.train", *COMMON, "--output_dir", str(run_dir), *args],
               LAUNCHER_DEBUG_WEIGHTS_DIR=str(weights))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    train, val = read_metrics(run_dir)
    return {
        "train": train,
        "val": val,
        "plan": json.loads((run_dir / "plan.json").read_text()),
        "weights": {p.stem: torch.load(p) for p in sorted(weights.glob("rank*.pt"))},
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, dict]:
    tmp = tmp_path_factory.mktemp("equivalence")
    accelerate = [*ACCELERATE, "--config_file", "accelerate_configs/cpu_ddp.yaml"]
    return {
        "2x16": _train(tmp, "ddp", accelerate, "--train.batch_size=16"),
        "1x32": _train(tmp, "single", [sys.executable], "--train.batch_size=32"),
        "1x16x2": _train(tmp, "accum", [sys.executable], "--train.batch_size=16", "--train.grad_accum_steps=2"),
    }


def test_plans_report_the_same_global_batch(runs):
    shapes = {name: (r["plan"]["per_device_batch"], r["plan"]["num_processes"], r["plan"]["grad_accum_steps"])
              for name, r in runs.items()}
    assert shapes == {"2x16": (16, 2, 1), "1x32": (32, 1, 1), "1x16x2": (16, 1, 2)}
    assert {r["plan"]["global_batch"] for r in runs.values()} == {32}
    assert {r["plan"]["steps_per_epoch"] for r in runs.values()} == {NUM_TRAIN // 32}


@pytest.mark.parametrize("name", ["2x16", "1x16x2"])
def test_same_lr_and_train_loss_at_every_step(runs, name):
    ref, other = runs["1x32"]["train"], runs[name]["train"]
    assert [r["step"] for r in other] == [r["step"] for r in ref] == list(range(1, 3 * NUM_TRAIN // 32 + 1))
    assert [r["lr"] for r in other] == pytest.approx([r["lr"] for r in ref], rel=1e-12)
    assert [r["train/loss"] for r in other] == pytest.approx([r["train/loss"] for r in ref], rel=TRAIN_LOSS_RTOL)
    # The run really trained (a constant loss would make the comparison vacuous).
    assert ref[-1]["train/loss"] < ref[0]["train/loss"] - 0.2


def test_ranks_keep_identical_weights(runs):
    weights = runs["2x16"]["weights"]
    assert sorted(weights) == ["rank0", "rank1"]
    for key, value in weights["rank0"].items():
        assert torch.equal(value, weights["rank1"][key]), key


@pytest.mark.parametrize("name", ["2x16", "1x16x2"])
def test_final_weights_match_one_process(runs, name):
    ref, other = runs["1x32"]["weights"]["rank0"], runs[name]["weights"]["rank0"]
    assert sorted(ref) == sorted(other)
    for key in ref:
        torch.testing.assert_close(other[key], ref[key], rtol=0, atol=WEIGHTS_ATOL)


def test_exact_evaluation_does_not_double_count_the_padded_last_batch(runs):
    assert NUM_TEST % (2 * VAL_BATCH_PER_DEVICE) != 0  # the last batch really is uneven
    ddp, single = runs["2x16"]["val"], runs["1x32"]["val"]
    assert [r["epoch"] for r in ddp] == [r["epoch"] for r in single] == [1, 2, 3]
    for a, b in zip(ddp, single):
        assert a["val/accuracy"] == pytest.approx(b["val/accuracy"], rel=VAL_RTOL)
        assert a["val/loss"] == pytest.approx(b["val/loss"], rel=VAL_RTOL)
        # Accuracy over 200 samples is a multiple of 1/200; a double-counted sample would break that.
        assert abs(a["val/accuracy"] * NUM_TEST - round(a["val/accuracy"] * NUM_TEST)) < 1e-6
