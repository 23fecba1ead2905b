"""Fault injection and debugging dumps for tests, loaded as a launcher hook (launcher.hooks).

tests/helpers.py starts every CLI subprocess with LAUNCHER_HOOKS=faults:from_env and tests/ on
PYTHONPATH; the hook reads these variables once at start and does nothing when none is set:

    LAUNCHER_INJECT_NONFINITE="STEP[:RANK][,...]"  make the loss NaN at optimizer step STEP (1-based; a
                                                   range A-B is allowed) on RANK (default: every rank)
    LAUNCHER_TEST_KILL_AT_STEP="STEP[:RANK]"       SIGKILL the process right after optimizer step STEP
    LAUNCHER_TEST_KILL_IN_SAVE="STEP"              SIGKILL the main process while checkpoint STEP is half written
    LAUNCHER_TEST_PAUSE_AT_STEP="STEP[:RANK]"      after step STEP, write <run_dir>/.paused-rank<R> (holding the
                                                   pid) and wait up to 120 s for a preemption signal
    LAUNCHER_RANK_LOG_DIR=DIR                      after each epoch, append {epoch, step, lr, plateau} to
                                                   DIR/rank<R>.jsonl (what each rank applied)
    LAUNCHER_DEBUG_WEIGHTS_DIR=DIR                 save each rank's weights to DIR/start-rank<R>.pt at the start
                                                   and to DIR/rank<R>.pt at the end
"""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import dataclass, field

import torch

from launcher.errors import UsageError
from launcher.hooks import Hook


def parse_steps(var: str, value: str) -> dict[int, int | None]:
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
class Faults(Hook):
    nonfinite: dict[int, int | None] = field(default_factory=dict)
    kill_at: dict[int, int | None] = field(default_factory=dict)
    kill_in_save: set[int] = field(default_factory=set)
    pause_at: dict[int, int | None] = field(default_factory=dict)
    rank: int = 0

    def _hit(self, table: dict[int, int | None], step: int) -> bool:
        return step in table and table[step] in (None, self.rank)

    def on_train_start(self, trainer) -> None:
        self.rank = trainer.accelerator.process_index

    def on_loss(self, trainer, loss: torch.Tensor, step: int) -> torch.Tensor:
        return loss * float("nan") if self._hit(self.nonfinite, step) else loss

    def after_step(self, trainer) -> None:
        step = trainer.state.step
        if self._hit(self.kill_at, step):
            os.kill(os.getpid(), signal.SIGKILL)
        if self._hit(self.pause_at, step):
            marker = os.path.join(trainer.run_dir, f".paused-rank{self.rank}")
            with open(marker, "w") as f:
                f.write(str(os.getpid()))
            deadline = time.monotonic() + 120
            while not trainer.preemption.requested and time.monotonic() < deadline:
                time.sleep(0.02)
            os.remove(marker)

    def on_save(self, trainer, step: int, path: str) -> None:
        if step in self.kill_in_save:
            os.kill(os.getpid(), signal.SIGKILL)


class RankLog(Hook):
    """What each rank applied after every epoch: LR and plateau state."""

    def __init__(self, directory: str):
        self.directory = directory

    def on_epoch_end(self, trainer, metrics) -> None:
        scheduler = trainer.scheduler
        row = {"epoch": trainer.state.epoch, "step": trainer.state.step, "lr": scheduler.get_last_lr()[0],
               "plateau": scheduler.plateau.state_dict() if scheduler.plateau else None}
        with open(os.path.join(self.directory, f"rank{trainer.accelerator.process_index}.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")


class WeightsDump(Hook):
    """Every rank's weights at the start (start-rank<R>.pt) and at the end (rank<R>.pt), to compare them bitwise."""

    def __init__(self, directory: str):
        self.directory = directory

    def _dump(self, trainer, prefix: str) -> None:
        weights = trainer.accelerator.unwrap_model(trainer.model).state_dict()
        torch.save({k: v.detach().float().cpu() for k, v in weights.items()},
                   os.path.join(self.directory, f"{prefix}rank{trainer.accelerator.process_index}.pt"))

    def on_train_start(self, trainer) -> None:
        self._dump(trainer, "start-")

    def on_finish(self, trainer, summary) -> None:
        self._dump(trainer, "")


def from_env() -> list[Hook]:
    env = os.environ
    hooks: list[Hook] = []
    faults = Faults(
        nonfinite=parse_steps("LAUNCHER_INJECT_NONFINITE", env.get("LAUNCHER_INJECT_NONFINITE", "")),
        kill_at=parse_steps("LAUNCHER_TEST_KILL_AT_STEP", env.get("LAUNCHER_TEST_KILL_AT_STEP", "")),
        kill_in_save=set(parse_steps("LAUNCHER_TEST_KILL_IN_SAVE", env.get("LAUNCHER_TEST_KILL_IN_SAVE", ""))),
        pause_at=parse_steps("LAUNCHER_TEST_PAUSE_AT_STEP", env.get("LAUNCHER_TEST_PAUSE_AT_STEP", "")))
    if faults.nonfinite or faults.kill_at or faults.kill_in_save or faults.pause_at:
        hooks.append(faults)
    if env.get("LAUNCHER_RANK_LOG_DIR"):
        hooks.append(RankLog(env["LAUNCHER_RANK_LOG_DIR"]))
    if env.get("LAUNCHER_DEBUG_WEIGHTS_DIR"):
        hooks.append(WeightsDump(env["LAUNCHER_DEBUG_WEIGHTS_DIR"]))
    return hooks
