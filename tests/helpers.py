"""Shared helpers for tests that run the real CLIs in subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CPU_DDP = str(ROOT / "accelerate_configs" / "cpu_ddp.yaml")

# Small, fast MNIST-1D settings for tests that only need the plumbing.
TINY = ["--task.options.num_train=512", "--task.options.num_test=200", "--train.progress_bar=off"]


def env(**extra: str) -> dict[str, str]:
    e = dict(os.environ)
    e.setdefault("OMP_NUM_THREADS", "1")
    e["WANDB_MODE"] = e.get("WANDB_MODE", "disabled")
    e["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), e.get("PYTHONPATH", "")) if p)
    e.update(extra)
    return e


def run(args: list[str], cwd: Path | str = ROOT, timeout: int = 300, **extra_env: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env=env(**extra_env), capture_output=True, text=True, timeout=timeout)


def train(*args: str, cwd: Path | str = ROOT, timeout: int = 300, **extra_env: str) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "launcher.train", *args], cwd=cwd, timeout=timeout, **extra_env)


def train_ddp(*args: str, num_processes: int = 2, module: str = "launcher.train", cwd: Path | str = ROOT,
              timeout: int = 300, **extra_env: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", CPU_DDP,
           "--num_processes", str(num_processes), "-m", module, *args]
    return run(cmd, cwd=cwd, timeout=timeout, **extra_env)


def read_metrics(run_dir: Path | str) -> tuple[list[dict], list[dict]]:
    """(step rows, eval rows) of a run's metrics.jsonl."""
    rows = [json.loads(line) for line in Path(run_dir, "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "train/loss" in r]
    evals = [r for r in rows if "val/loss" in r]
    return steps, evals


def assert_usage_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """Exit 2, exactly one line on stderr naming the problem, no traceback."""
    assert result.returncode == 2, (result.returncode, result.stdout[-2000:], result.stderr[-2000:])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
