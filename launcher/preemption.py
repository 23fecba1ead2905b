"""Preemption signals and the exit statuses that tell a wrapper what happened.

`Preemption` turns SIGTERM and `checkpoint.signal` (default SIGUSR1) into a flag. The handler only
sets the flag, so a second signal while a checkpoint is being written interrupts nothing. The
trainer acts on the flag without a per-step collective: one process acts at the step in flight;
several agree on it in the all-reduce that already reads the step rows back, every
`train.log_every_n_steps` steps, before each checkpoint and in each evaluation, so the checkpoint
is written within `train.log_every_n_steps` optimizer steps of the signal (docs/checkpoints.md).

Exit statuses (the contract with Slurm templates and other wrappers): `PREEMPTED_EXIT` (124) means
"preempted, checkpoint saved; resume with --resume auto"; `NONFINITE_EXIT` (3) means training
stopped on non-finite loss or gradients (requeueing would not help).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Callable

from launcher.errors import UsageError

PREEMPTED_EXIT = 124
NONFINITE_EXIT = 3
EXIT_STATUS = {"preempted": PREEMPTED_EXIT, "nonfinite": NONFINITE_EXIT}
"""summary.json `status` -> process exit status (0 for anything else)."""


def exit_status(status: str) -> int:
    return EXIT_STATUS.get(status, 0)


class Preemption:
    """SIGTERM and the recipe's signal set `requested`; `run_hooks` runs after the checkpoint is saved.

    Hooks: Python callables in `callbacks` (called with the checkpoint path on the main process) and
    the shell command in $LAUNCHER_ON_PREEMPT (run on the main process with $LAUNCHER_CHECKPOINT and
    $LAUNCHER_RUN_DIR set), e.g. `scontrol requeue $SLURM_JOB_ID`.
    """

    def __init__(self, signal_name: str = "SIGUSR1"):
        sig = getattr(signal, signal_name, None)
        if not isinstance(sig, signal.Signals):
            raise UsageError(f"checkpoint.signal: {signal_name!r} is not a signal on this system; use e.g. SIGUSR1")
        if sig in (signal.SIGKILL, signal.SIGSTOP):
            raise UsageError(f"checkpoint.signal: {signal_name} cannot be caught; use e.g. SIGUSR1")
        self.signals = [signal.SIGTERM] + ([sig] if sig != signal.SIGTERM else [])
        self.requested = False
        self.received: str | None = None
        self.callbacks: list[Callable[[str], None]] = []
        self._previous: dict[signal.Signals, object] = {}

    def install(self) -> None:
        for sig in self.signals:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals cannot be caught here
                print(f"warning: cannot install a {sig.name} handler outside the main thread; "
                      "preemption signals will not checkpoint", file=sys.stderr, flush=True)

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def ignore_further(self) -> None:
        """After a preempted run: ignore these signals until the process exits."""
        for sig in self.signals:
            with contextlib.suppress(ValueError):  # not the main thread: nothing was installed
                signal.signal(sig, signal.SIG_IGN)

    def _handle(self, signum: int, frame) -> None:
        # Only set a flag: the loop acts on it at the next step boundary, and a repeated signal
        # (e.g. during the checkpoint write) changes nothing.
        self.requested = True
        self.received = self.received or signal.Signals(signum).name

    def run_hooks(self, checkpoint: str, run_dir: str) -> None:
        for callback in self.callbacks:
            callback(checkpoint)
        command = os.environ.get("LAUNCHER_ON_PREEMPT")
        if command:
            env = {**os.environ, "LAUNCHER_CHECKPOINT": checkpoint, "LAUNCHER_RUN_DIR": run_dir}
            result = subprocess.run(command, shell=True, env=env, check=False)
            if result.returncode != 0:
                print(f"warning: LAUNCHER_ON_PREEMPT exited with status {result.returncode}", file=sys.stderr,
                      flush=True)
