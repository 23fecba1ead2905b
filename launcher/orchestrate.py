"""Running many trainings: one after another or K at once, each any launch; skip, resume, stop cleanly.

Used by `python -m launcher.compare --train` and `python -m launcher.sweep`. A `Job` is one run
directory and the `launcher.train` arguments that fill it. `run_jobs` decides for each job:

- `summary.json` says completed: skipped;
- the directory exists with a checkpoint: resumed (`--resume auto`);
- it exists without a checkpoint (killed before the first one): moved aside to
  `<name>.incomplete-<time>` and started again, so nothing is overwritten;
- otherwise: started.

Each training's whole output goes to `<log_dir>/<job>.log`; its epoch lines are echoed as
`[3/8 lr0.005-seed1] epoch 2/3 ...`. Trainings run in their own process group, so Ctrl-C reaches
only this process, which then sends SIGTERM to every running training (the trainer saves a
checkpoint and exits with 124), waits for them, says how to continue, and exits with 130.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from launcher.errors import UsageError
from launcher.runs import completed

INTERRUPTED_EXIT = 130
STOP_GRACE_S = 60  # how long stopped trainings get to write their checkpoint before they are killed


@dataclass
class Job:
    """One training: its run directory and the arguments after `-m launcher.train`."""

    run_dir: Path
    args: list[str] = field(default_factory=list)
    """Recipe and overrides, e.g. ['--recipe', 'r.yaml', '--train.seed=1']; --output_dir/--resume are added."""
    what: str = ""
    """Shown in the progress line: `[1/4 name] training <what>`."""

    @property
    def name(self) -> str:
        return self.run_dir.name


def launch_prefix(accelerate_config: str | None = None, num_processes: int | None = None) -> list[str]:
    """The command before `-m launcher.train`: plain Python (one process), or `accelerate launch`.

    With an accelerate config (DDP, FSDP, DeepSpeed) the rendezvous port is left to the system
    (`--main_process_port 0`), so several trainings on one machine do not collide.
    """
    if accelerate_config is None:
        if num_processes not in (None, 1):
            raise UsageError("--num_processes needs --accelerate_config (e.g. accelerate_configs/cpu_ddp.yaml)")
        return [sys.executable]
    if not Path(accelerate_config).is_file():
        raise UsageError(f"--accelerate_config {accelerate_config!r} not found; see accelerate_configs/")
    prefix = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(Path(accelerate_config).resolve()),
              "--main_process_port", "0"]
    if num_processes is not None:
        if isinstance(num_processes, bool) or not isinstance(num_processes, int) or num_processes < 1:
            raise UsageError(f"--num_processes must be an integer >= 1; got {num_processes!r}")
        prefix += ["--num_processes", str(num_processes)]
    return prefix


def check_output_dir(output_dir: str | Path) -> Path:
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output_dir {str(output_dir)!r} exists and is not a directory; choose another --output_dir")
    return out


def _prepare(job: Job, tag: str) -> list[str] | None:
    """The `--resume` arguments for a job, or None when it is already completed."""
    if completed(job.run_dir):
        print(f"{tag} already completed in {job.run_dir}; skipped", flush=True)
        return None
    if not job.run_dir.exists():
        return []
    checkpoints = job.run_dir / "checkpoints"
    if checkpoints.is_dir() and any(checkpoints.iterdir()):
        print(f"{tag} incomplete; resuming from its last checkpoint", flush=True)
        return ["--resume", "auto"]
    aside = job.run_dir.with_name(f"{job.name}.incomplete-{time.strftime('%Y%m%d-%H%M%S')}")
    job.run_dir.rename(aside)
    print(f"{tag} incomplete without a checkpoint; moved to {aside.name} and started again", flush=True)
    return []


def _death_signal():
    """A child-side hook: SIGTERM the training when the orchestrator dies (Linux), so an orphaned
    training checkpoints and stops. libc is loaded here, in the parent, never after the fork."""
    try:
        import ctypes

        prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def hook() -> None:
        prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG

    return hook


class _Running:
    """A started training, its output copied to its log (and epoch lines to the console) by a thread."""

    def __init__(self, cmd: list[str], log_path: Path, tag: str):
        self.tag, self.log_path = tag, log_path
        self.tail: list[str] = []
        self.log = open(log_path, "a", encoding="utf-8")  # noqa: SIM115 - closed by the reader thread
        self.log.write("$ " + " ".join(cmd) + "\n")
        self.log.flush()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        # Its own session (so its own process group): Ctrl-C in the terminal reaches only the
        # orchestrator, which then stops the training itself.
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                     start_new_session=True, preexec_fn=_death_signal())
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        with self.log:
            for line in self.proc.stdout:
                self.log.write(line)
                self.tail = [*self.tail[-19:], line.rstrip()]
                if line.startswith(("epoch ", "completed", "error", "stopped", "resum")):
                    print(f"{self.tag} {line.rstrip()}", flush=True)

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGTERM)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)


def run_jobs(jobs: list[Job], log_dir: Path, prefix: list[str] | None = None, parallel: int = 1,
             continue_hint: str = "rerun the same command") -> list[str]:
    """Train every job that is not completed yet, `parallel` at a time; returns the names of failed jobs.

    Ctrl-C stops every running training with SIGTERM (checkpoint, exit 124), prints how to
    continue and exits with status 130.
    """
    if isinstance(parallel, bool) or not isinstance(parallel, int) or parallel < 1:
        raise UsageError(f"--parallel must be an integer >= 1; got {parallel!r}")
    prefix = prefix or [sys.executable]
    log_dir.mkdir(parents=True, exist_ok=True)
    pending = list(enumerate(jobs, 1))
    running: dict[str, tuple[Job, _Running]] = {}
    failed: list[str] = []
    skipped = 0
    started = time.perf_counter()
    try:
        while pending or running:
            while pending and len(running) < parallel:
                n, job = pending.pop(0)
                tag = f"[{n}/{len(jobs)} {job.name}]"
                resume = _prepare(job, tag)
                if resume is None:
                    skipped += 1
                    continue
                cmd = [*prefix, "-m", "launcher.train", *job.args, "--output_dir", str(job.run_dir), *resume]
                print(f"{tag} training{' ' + job.what if job.what else ''} (elapsed {time.perf_counter() - started:.0f}s)", flush=True)
                running[job.name] = (job, _Running(cmd, log_dir / f"{job.name}.log", tag))
            for name, (job, r) in list(running.items()):
                code = r.proc.poll()
                if code is None:
                    continue
                r.reader.join(timeout=10)
                del running[name]
                if code != 0 or not completed(job.run_dir):
                    failed.append(name)
                    print("\n".join(f"{r.tag}   | {t}" for t in r.tail[-8:]), flush=True)
                    print(f"{r.tag} FAILED with exit status {code}; log: {r.log_path}", flush=True)
            time.sleep(0.1)
    except KeyboardInterrupt:
        _stop_all([r for _, r in running.values()])
        print(f"\ninterrupted: {len(running)} running training(s) stopped (checkpoints kept); to continue, "
              f"{continue_hint} (completed runs are skipped, interrupted ones resume)", file=sys.stderr, flush=True)
        raise SystemExit(INTERRUPTED_EXIT) from None
    trained = len(jobs) - skipped - len(failed)
    print(f"trained {trained}, skipped {skipped} completed, failed {len(failed)} of {len(jobs)} runs in "
          f"{time.perf_counter() - started:.0f}s", flush=True)
    if failed:
        print(f"failed: {', '.join(failed)} ({continue_hint} to retry them)", file=sys.stderr, flush=True)
    return failed


def _stop_all(running: list[_Running]) -> None:
    """SIGTERM every training; a second Ctrl-C, or STOP_GRACE_S, kills the ones still running."""
    for r in running:
        r.stop()
    deadline = time.monotonic() + STOP_GRACE_S
    try:
        while any(r.proc.poll() is None for r in running) and time.monotonic() < deadline:
            time.sleep(0.1)
    except KeyboardInterrupt:
        pass
    for r in running:
        if r.proc.poll() is None:
            r.kill()
        r.proc.wait()
        r.reader.join(timeout=5)


# ---------------------------------------------------------------------------------------------
# compare --train: several recipes x seeds
# ---------------------------------------------------------------------------------------------


def override_text(value: Any) -> str:
    """A value as a `--key=value` command-line text that launcher.train reads back to the same value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return ",".join(override_text(v) for v in value)
    return str(value)


def train_recipes(recipes: list[str], seeds: int, output_dir: str, overrides: dict[str, Any]) -> list[str]:
    """Train each recipe x seed with `python -m launcher.train`, one after another; returns the run dirs.

    Run `k` of a recipe uses `train.seed = <recipe seed> + k`, in `<output_dir>/<recipe>-seed<S>`.
    Runs already completed there are kept and skipped, so the same command continues an
    interrupted comparison. A run that fails is reported and the others still run.
    """
    from launcher.config import load_config

    for key in overrides:
        if key.lstrip("-") in ("train.seed", "seed"):
            raise UsageError("--train.seed cannot be overridden here: --seeds N trains seeds <recipe seed> .. +N-1")
    extra = [f"--{k.lstrip('-')}={override_text(v)}" for k, v in overrides.items()]
    out = check_output_dir(output_dir)
    if not any(k.lstrip("-") == "tracking.wandb.group" for k in overrides):
        extra.append(f"--tracking.wandb.group={out.resolve().name}")  # one W&B group per comparison
    jobs = []
    for recipe in recipes:
        cfg = load_config(recipe, overrides)  # every recipe and override checked before anything runs
        for k in range(seeds):
            seed = cfg.train.seed + k
            jobs.append(Job(out / f"{Path(recipe).stem}-seed{seed}", ["--recipe", recipe, f"--train.seed={seed}", *extra],
                            what=f"{recipe} seed {seed}"))
    names = [j.name for j in jobs]
    if len(set(names)) != len(names):
        raise UsageError("two recipes share a file name; give each recipe a distinct file name")
    out.mkdir(parents=True, exist_ok=True)
    failed = run_jobs(jobs, out / "logs", launch_prefix())
    return [str(j.run_dir) for j in jobs if j.name not in failed]
