"""Decisions taken at an optimizer-step boundary, agreed by every rank: preempt, skip, stop.

- `Preemption` turns SIGTERM and `checkpoint.signal` (default SIGUSR1) into a flag. The handler
  only sets the flag, so a second signal while a checkpoint is being written interrupts nothing.
- `StepGuard` checks the step's loss and gradient norm for NaN/inf and all-reduces one small
  tensor `[non-finite, preempt requested]` per optimizer step, so every rank takes the same branch
  (a rank that skipped or stopped alone would leave the others waiting in a collective).
- `Faults` are testing aids read once from the environment at start (see docs/checkpoints.md):

    LAUNCHER_INJECT_NONFINITE="STEP[:RANK][,...]"  make the loss NaN at optimizer step STEP (1-based; a
                                                   range A-B is allowed) on RANK (default: every rank)
    LAUNCHER_TEST_KILL_AT_STEP="STEP[:RANK]"       SIGKILL the process right after optimizer step STEP
    LAUNCHER_TEST_KILL_IN_SAVE="STEP"              SIGKILL the main process while checkpoint STEP is half written
    LAUNCHER_TEST_PAUSE_AT_STEP="STEP[:RANK]"      after step STEP, write <run_dir>/.paused-rank<R> (holding the
                                                   pid) and wait up to 120 s for a preemption signal

Exit statuses (the contract with Slurm templates and other wrappers): `PREEMPTED_EXIT` (124) means
"preempted, checkpoint saved; resume with --resume auto"; `NONFINITE_EXIT` (3) means training
stopped on non-finite loss or gradients (requeueing would not help).
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

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


# ---------------------------------------------------------------------------------------------
# Testing aids
# ---------------------------------------------------------------------------------------------


def _parse_steps(var: str, value: str) -> dict[int, int | None]:
    """'5,7-9:1' -> {5: None, 7: 1, 8: 1, 9: 1} (step -> rank, None = every rank)."""
    out: dict[int, int | None] = {}
    try:
        for part in filter(None, (p.strip() for p in value.split(","))):
            steps, _, rank = part.partition(":")
            first, _, last = steps.partition("-")
            for step in range(int(first), int(last or first) + 1):
                out[step] = int(rank) if rank else None
    except ValueError:
        raise UsageError(f"{var}={value!r}: expected STEP[:RANK][,...], e.g. {var}=5:1") from None
    return out


@dataclass
class Faults:
    """Test-only fault injection, parsed once at start from the environment (see module docstring)."""

    nonfinite: dict[int, int | None] = field(default_factory=dict)
    kill_at: dict[int, int | None] = field(default_factory=dict)
    kill_in_save: set[int] = field(default_factory=set)
    pause_at: dict[int, int | None] = field(default_factory=dict)
    rank: int = 0

    @classmethod
    def from_env(cls, rank: int) -> Faults:
        env = os.environ
        return cls(nonfinite=_parse_steps("LAUNCHER_INJECT_NONFINITE", env.get("LAUNCHER_INJECT_NONFINITE", "")),
                   kill_at=_parse_steps("LAUNCHER_TEST_KILL_AT_STEP", env.get("LAUNCHER_TEST_KILL_AT_STEP", "")),
                   kill_in_save=set(_parse_steps("LAUNCHER_TEST_KILL_IN_SAVE",
                                                 env.get("LAUNCHER_TEST_KILL_IN_SAVE", ""))),
                   pause_at=_parse_steps("LAUNCHER_TEST_PAUSE_AT_STEP", env.get("LAUNCHER_TEST_PAUSE_AT_STEP", "")),
                   rank=rank)

    def _hit(self, table: dict[int, int | None], step: int) -> bool:
        return step in table and table[step] in (None, self.rank)

    def corrupt_loss(self, loss: torch.Tensor, step: int) -> torch.Tensor:
        """`step` is the optimizer step the micro-batch belongs to (1-based)."""
        return loss * float("nan") if self._hit(self.nonfinite, step) else loss

    def after_step(self, step: int, run_dir: str, preemption: Preemption) -> None:
        if self._hit(self.kill_at, step):
            os.kill(os.getpid(), signal.SIGKILL)
        if self._hit(self.pause_at, step):
            marker = os.path.join(run_dir, f".paused-rank{self.rank}")
            with open(marker, "w") as f:
                f.write(str(os.getpid()))
            deadline = time.monotonic() + 120
            while not preemption.requested and time.monotonic() < deadline:
                time.sleep(0.02)
            os.remove(marker)

    def in_save(self, step: int) -> None:
        if step in self.kill_in_save:
            os.kill(os.getpid(), signal.SIGKILL)


# ---------------------------------------------------------------------------------------------
# The per-step agreement
# ---------------------------------------------------------------------------------------------


@dataclass
class Verdict:
    nonfinite_ranks: int = 0
    """How many ranks saw a non-finite loss or gradient norm in this step (0 = a good step)."""
    nonfinite_loss_ranks: int = 0
    """How many of them had a non-finite loss (the others: only gradients, e.g. NaN averaged in by DDP)."""
    preempt: bool = False
    stop: bool = False
    """Stop training (on_nonfinite=stop, or too many consecutive skips)."""
    consecutive_skips: int = 0


class StepGuard:
    """One small all-reduce per optimizer step: [non-finite on this rank, preemption requested here].

    Gradient norms are checked only without a gradient scaler: with fp16, an overflow is the
    scaler's business (it skips the step and lowers the scale), not a reason to stop.
    """

    def __init__(self, accelerator, on_nonfinite: str, max_nonfinite_skips: int, preemption: Preemption):
        self.accelerator = accelerator
        self.on_nonfinite = on_nonfinite
        self.max_skips = max_nonfinite_skips
        self.preemption = preemption
        self.consecutive_skips = 0

    def check(self, loss: torch.Tensor, grad_norm: torch.Tensor | None) -> Verdict:
        acc = self.accelerator
        values = [loss.detach().float().reshape(())]
        if isinstance(grad_norm, torch.Tensor) and getattr(acc, "scaler", None) is None:
            values.append(grad_norm.detach().float().reshape(()).to(loss.device))
        if acc.num_processes == 1:  # read the values back (the one host sync) and decide here: ~4x cheaper
            finite = [math.isfinite(v) for v in torch.stack(values).tolist()]
            return self._decide(int(not all(finite)), int(not finite[0]), self.preemption.requested)
        ok = torch.isfinite(torch.stack(values))
        flags = torch.stack([~ok.all(), ~ok[0], torch.tensor(self.preemption.requested, device=loss.device)])
        nonfinite, loss_ranks, preempt = acc.reduce(flags.float(), reduction="sum").tolist()  # the host sync
        return self._decide(int(nonfinite), int(loss_ranks), preempt > 0)

    def agree_preempt(self) -> bool:
        """Outside a step (e.g. after an epoch's evaluation): does any rank want to stop?"""
        acc = self.accelerator
        flag = torch.tensor([float(self.preemption.requested)], device=acc.device)
        if acc.num_processes > 1:
            flag = acc.reduce(flag, reduction="sum")
        return flag.item() > 0

    def _decide(self, nonfinite_ranks: int, loss_ranks: int, preempt: bool) -> Verdict:
        if not nonfinite_ranks:
            self.consecutive_skips = 0
            return Verdict(preempt=preempt)
        self.consecutive_skips += 1
        stop = self.on_nonfinite == "stop" or self.consecutive_skips >= self.max_skips
        return Verdict(nonfinite_ranks=nonfinite_ranks, nonfinite_loss_ranks=loss_ranks, preempt=preempt,
                       stop=stop, consecutive_skips=self.consecutive_skips)
