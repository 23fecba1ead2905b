"""The per-epoch progress bar, as a hook: opened at an epoch's start, moved at each flush (no per-step cost)."""

from __future__ import annotations

import sys

from launcher.hooks import Hook


class ProgressBar(Hook):
    """tqdm on the main process when `train.progress_bar` is `on`, or `auto` and stderr is a terminal."""

    def __init__(self, mode: str, is_main: bool):
        self.enabled = is_main and (mode == "on" or (mode == "auto" and sys.stderr.isatty()))
        self.bar = None

    def write(self, message: str) -> bool:
        """Print above the bar; False when no bar is open (the caller prints)."""
        if self.bar is None:
            return False
        self.bar.write(message)
        return True

    def on_epoch_start(self, trainer) -> None:
        if not self.enabled:
            return
        from tqdm.auto import tqdm

        s, plan = trainer.state, trainer.plan
        self.bar = tqdm(total=plan.steps_per_epoch, initial=s.step_in_epoch, desc=f"epoch {s.epoch + 1}/{plan.num_epochs}",
                        unit="step", leave=False, dynamic_ncols=True)

    def on_flush(self, trainer, rows) -> None:
        if self.bar is None or not rows:
            return
        last = rows[-1]
        loss = last["train/loss"]
        self.bar.set_postfix(loss="nan" if loss is None else f"{loss:.4f}", lr=f"{last['lr']:.2e}", refresh=False)
        self.bar.n = trainer.state.step_in_epoch
        self.bar.refresh()

    def on_epoch_end(self, trainer, metrics) -> None:
        self.close()

    def on_finish(self, trainer, summary) -> None:
        self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
