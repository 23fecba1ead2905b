"""Mixed precision on CPU: bf16 really runs (autocast) and trains; fp16 is refused with the fix.

`train.mixed_precision: auto` takes the accelerate config's value. fp16 on a CPU would be silently
ignored by Accelerate (it still reports fp16), so it stops with one line suggesting bf16, from one
process and from a 2-process launch alike. fp16 with loss scaling is checked on a GPU in tests/gpu/.
"""

from __future__ import annotations

import json
import math

import pytest

from launcher.errors import UsageError
from launcher.launch_checks import resolve_mixed_precision

from helpers import ACCELERATE, EXITS_ENV, assert_usage_exits, read_metrics, recording_exits, run, train

SMALL = ["--recipe", "recipes/mnist1d.yaml", "--task.options.num_train=640", "--task.options.num_test=200",
         "--train.num_epochs=2", "--checkpoint.enabled=false"]
FP16_ERROR = ("error: train.mixed_precision: fp16 needs a GPU (on CPU Accelerate silently ignores it); "
              "use --train.mixed_precision=bf16 or no")


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("requested", "env", "has_gpu", "expected"), [
    ("auto", None, False, "no"),
    ("auto", "bf16", False, "bf16"),
    ("auto", "fp16", True, "fp16"),
    ("no", "bf16", False, "no"),  # the recipe wins over the accelerate config
    ("bf16", "no", False, "bf16"),
    ("fp16", None, True, "fp16"),
])
def test_resolution(monkeypatch, requested, env, has_gpu, expected):
    if env is None:
        monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    else:
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", env)
    assert resolve_mixed_precision(requested, has_gpu) == expected


def test_fp16_without_gpu_and_unsupported_values_are_usage_errors(monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    with pytest.raises(UsageError, match="use --train.mixed_precision=bf16 or no"):
        resolve_mixed_precision("auto", has_gpu=False)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp8")
    with pytest.raises(UsageError, match="'fp8' .* is not supported; use no, bf16 or fp16"):
        resolve_mixed_precision("auto", has_gpu=True)


@pytest.mark.slow
def test_bf16_on_cpu_trains_and_really_runs_in_bf16(tmp_path):
    runs = {}
    for precision in ("bf16", "no"):
        run_dir = tmp_path / precision
        proc = train(*SMALL, "--output_dir", str(run_dir), f"--train.mixed_precision={precision}")
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"device cpu, mixed precision {precision}" in proc.stdout
        assert json.loads((run_dir / "plan.json").read_text())["mixed_precision"] == precision
        runs[precision], _ = read_metrics(run_dir)
    losses = [r["train/loss"] for r in runs["bf16"]]
    assert len(losses) == 40 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.2  # it learns
    # Autocast really happened: bf16 rounding moves the very first loss away from the fp32 one.
    first_bf16, first_fp32 = runs["bf16"][0]["train/loss"], runs["no"][0]["train/loss"]
    assert first_bf16 != first_fp32 and first_bf16 == pytest.approx(first_fp32, rel=2e-2)


@pytest.mark.slow
def test_auto_takes_the_accelerate_config_value(tmp_path):
    # single_gpu.yaml says bf16; on a CPU-only machine it trains on the CPU, still in bf16.
    run_dir = tmp_path / "run"
    proc = run([*ACCELERATE, "--config_file", "accelerate_configs/single_gpu.yaml",
                "-m", "launcher.train", *SMALL, "--train.num_epochs=1", "--output_dir", str(run_dir)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "topology: NO, 1 process(es) on 1 machine(s), device cpu, mixed precision bf16" in proc.stdout
    assert json.loads((run_dir / "plan.json").read_text())["mixed_precision"] == "bf16"


def test_fp16_on_cpu_exits_2_with_one_line_and_writes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    proc = train(*SMALL, "--output_dir", str(run_dir), "--train.mixed_precision=fp16", timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [FP16_ERROR]
    assert not run_dir.exists()


@pytest.mark.slow
def test_fp16_from_a_two_process_launch_is_reported_once(tmp_path):
    run_dir = tmp_path / "run"
    proc = run([*ACCELERATE, "--config_file", "accelerate_configs/cpu_ddp.yaml", "--mixed_precision", "fp16",
                *recording_exits("launcher.train"), *SMALL, "--output_dir", str(run_dir)],
               **{EXITS_ENV: str(tmp_path / "exits")})
    assert proc.returncode != 0
    assert [line for line in proc.stderr.splitlines() if line.startswith("error: ")] == [FP16_ERROR]
    assert_usage_exits(tmp_path / "exits")
    assert not run_dir.exists()
