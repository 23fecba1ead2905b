"""Shared helpers for tests that run the real CLIs in subprocesses."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CPU_DDP = str(ROOT / "accelerate_configs" / "cpu_ddp.yaml")
FSDP_CPU = str(ROOT / "tests" / "configs" / "fsdp_cpu.yaml")
"""FSDP2, SHARDED_STATE_DICT, on CPU processes: launch `-m fsdp_cpu MODULE` with it (tests/fsdp_cpu.py)."""
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch"]

# Small, fast MNIST-1D settings for tests that only need the plumbing.
TINY = ["--task.options.num_train=512", "--task.options.num_test=200", "--train.progress_bar=off"]

# Set by a launcher for the processes it starts; inherited by a subprocess, they would make a
# one-process run believe it is one rank of a larger job.
DISTRIBUTED_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def env(**extra: str) -> dict[str, str]:
    """A subprocess environment: the repo importable, one thread, W&B disabled unless this process sets a
    mode, the test hooks of tests/faults.py loaded (they act only on their LAUNCHER_TEST_* variables), and
    none of the distributed or ACCELERATE_* variables of this process; `extra` wins over all."""
    e = {k: v for k, v in os.environ.items() if k not in DISTRIBUTED_VARS and not k.startswith("ACCELERATE_")}
    e["OMP_NUM_THREADS"] = "1"
    e.setdefault("WANDB_MODE", "disabled")
    e["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), str(ROOT / "tests"), e.get("PYTHONPATH", "")) if p)
    e["LAUNCHER_HOOKS"] = "faults:from_env"
    e.update(extra)
    if str(ROOT / "tests") not in e["PYTHONPATH"].split(os.pathsep):  # an `extra` PYTHONPATH keeps the hooks
        e["PYTHONPATH"] = os.pathsep.join([e["PYTHONPATH"], str(ROOT / "tests")])
    return e


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL a command started by start() and every process of its group."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def start(args: list[str], cwd: Path | str = ROOT, **extra_env: str) -> subprocess.Popen:
    """Start a command in its own session (its own process group), output captured as text."""
    return subprocess.Popen(args, cwd=cwd, env=env(**extra_env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def run(args: list[str], cwd: Path | str = ROOT, timeout: int = 300, **extra_env: str) -> subprocess.CompletedProcess:
    """Run a command to the end in its own process group, so that a hang never leaves processes behind:
    past `timeout` seconds the whole group is killed and the test fails with the end of its stderr."""
    proc = start(args, cwd=cwd, **extra_env)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(map(str, args[:6]))} ... timed out after {timeout}s:\n{err[-3000:]}")
    except BaseException:  # interrupted (Ctrl-C, the pytest timeout): take the processes down too
        kill_group(proc)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def train(*args: str, cwd: Path | str = ROOT, timeout: int = 300, **extra_env: str) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "launcher.train", *args], cwd=cwd, timeout=timeout, **extra_env)


def train_ddp(*args: str, num_processes: int = 2, module: str = "launcher.train", cwd: Path | str = ROOT,
              timeout: int = 300, exits_to: Path | None = None, **extra_env: str) -> subprocess.CompletedProcess:
    """`accelerate launch` with the CPU DDP config; with `exits_to`, each worker records its exit status
    there (read it with `worker_exits`)."""
    target = ["-m", module]
    if exits_to is not None:
        extra_env[EXITS_ENV] = str(exits_to)
        target = recording_exits(module)
    cmd = [*ACCELERATE, "--config_file", CPU_DDP, "--num_processes", str(num_processes), *target, *args]
    return run(cmd, cwd=cwd, timeout=timeout, **extra_env)


def train_fsdp(*args: str, num_processes: int = 2, config: str = FSDP_CPU, timeout: int = 300,
               **extra_env: str) -> subprocess.CompletedProcess:
    """`accelerate launch` of launcher.train with Accelerate's FSDP (tests/fsdp_cpu.py) on CPU processes."""
    cmd = [*ACCELERATE, "--config_file", config, "--num_processes", str(num_processes), "-m", "fsdp_cpu",
           "launcher.train", *args]
    return run(cmd, timeout=timeout, **extra_env)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def fit_batch(task, optimizer, inputs, targets, steps: int) -> list[float]:
    """`steps` optimizer steps of task.model on one batch, in train mode: the loss of each step."""
    task.model.train()
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = task.loss(task.model(inputs), targets)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


# ---------------------------------------------------------------------------------------------
# Each worker's own exit status: `python -m helpers MODULE ARGS` runs `python -m MODULE ARGS`
# ---------------------------------------------------------------------------------------------

EXITS_ENV = "LAUNCHER_TEST_EXITS_DIR"
"""Where `python -m helpers` writes `rank<RANK>` holding the status the worker exits with (unset: nothing)."""


def recording_exits(module: str) -> list[str]:
    """`-m MODULE` for a launch command, run through this file so that each worker records the exit
    status it raises itself (e.g. the trainer's 3 or 124) in $LAUNCHER_TEST_EXITS_DIR: a test reads
    the launcher's own statuses there instead of the launcher's report of them (torch elastic's
    error table)."""
    return ["-m", "helpers", module]


def worker_exits(folder: Path | str) -> dict[int, int]:
    """rank -> the status that rank's worker exited with; a rank killed from outside (e.g. by torch
    elastic once another rank had exited) wrote nothing."""
    return {int(p.name.removeprefix("rank")): int(p.read_text()) for p in Path(folder).glob("rank*")}


def assert_usage_exits(folder: Path | str) -> None:
    """Rank 0, which prints the one `error:` line, exited with the usage status 2 itself, and no rank
    exited with anything else (a traceback would be 1; the others may be stopped while they wait)."""
    exits = worker_exits(folder)
    assert exits.get(0) == 2 and set(exits.values()) == {2}, exits


def _run_recording_exit(module: str, argv: list[str]) -> None:
    import runpy

    sys.argv = [module, *argv]
    status = 1  # an uncaught exception: Python exits with 1
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        status = 0
    except SystemExit as exit_:
        status = 0 if exit_.code is None else exit_.code if isinstance(exit_.code, int) else 1
        raise
    finally:
        folder = os.environ.get(EXITS_ENV)
        if folder:
            os.makedirs(folder, exist_ok=True)
            Path(folder, f"rank{os.environ.get('RANK', '0')}").write_text(str(status))


if __name__ == "__main__":
    _run_recording_exit(sys.argv[1], sys.argv[2:])
