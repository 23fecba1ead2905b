"""Plateau reduction of the LR: a multiplicative factor changed at epoch ends from a validation metric.

`style: torch` follows torch.optim.lr_scheduler.ReduceLROnPlateau step for step (best, bad epochs,
cooldown, min LR), except that epochs spent in warmup never count as bad; `style: keras` follows
Keras' ReduceLROnPlateau callback. `launcher.schedule.LRScheduler` multiplies the factor on top
of warmup x decay; every rank feeds it the same metric (computed over the whole validation set).
"""

from __future__ import annotations

import math
from typing import Any

from launcher.config import PlateauConfig


class Plateau:
    """ReduceLROnPlateau as a multiplicative factor, with all of its state in `state_dict`.

    `style: torch` follows torch.optim.lr_scheduler.ReduceLROnPlateau, `style: keras` follows Keras'
    ReduceLROnPlateau callback (keras/src/callbacks/reduce_lr_on_plateau.py): see `step`.
    """

    def __init__(self, cfg: PlateauConfig):
        self.cfg = cfg
        self.best = math.inf if cfg.mode == "min" else -math.inf
        self.num_bad_epochs = 0
        self.cooldown_counter = 0
        self.factor = 1.0
        self.num_reductions = 0
        self.last_epoch = 0

    def is_better(self, value: float) -> bool:
        c = self.cfg
        if math.isnan(value):
            return False
        if c.style == "keras":
            return value < self.best - c.min_delta if c.mode == "min" else value > self.best + c.min_delta
        if c.mode == "min":
            limit = self.best * (1 - c.threshold) if c.threshold_mode == "rel" else self.best - c.threshold
            return value < limit
        limit = self.best * (1 + c.threshold) if c.threshold_mode == "rel" else self.best + c.threshold
        return value > limit

    def step(self, value: float, scheduled_lr: float, epoch: int, counts: bool = True) -> str | None:
        """Record one epoch's metric. Returns a message when the factor was reduced.

        `scheduled_lr` is the LR the schedule will use next, without the plateau factor; it is used
        to keep reductions above `min_lr`. `counts=False` (inside warmup) only tracks the best value.
        """
        self.last_epoch = epoch
        if self.cfg.style == "keras":
            return self._step_keras(value, scheduled_lr, counts)
        if self.is_better(value):
            self.best = value
            self.num_bad_epochs = 0
        elif counts:
            self.num_bad_epochs += 1
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.num_bad_epochs = 0
        if self.num_bad_epochs <= self.cfg.patience:
            return None
        bad = self.num_bad_epochs
        old = self.factor
        new = old * self.cfg.factor
        if scheduled_lr > 0:
            new = max(new, self.cfg.min_lr / scheduled_lr)
        self.cooldown_counter = self.cfg.cooldown
        self.num_bad_epochs = 0
        if old - new <= 1e-12:
            return None
        self.factor = new
        self.num_reductions += 1
        return (f"plateau: {self.cfg.metric} has not improved for {bad} epochs (best {self.best:.4g}); "
                f"LR {scheduled_lr * old:.2e} -> {scheduled_lr * new:.2e}")

    def _step_keras(self, value: float, scheduled_lr: float, counts: bool) -> str | None:
        """Keras' on_epoch_end: the cooldown ticks first (and clears the bad-epoch count); an improvement
        resets the count; otherwise, outside cooldown, a bad epoch is counted and the LR drops once
        `patience` of them are reached, if it is above min_lr (then cooldown starts and the count clears)."""
        c = self.cfg
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.num_bad_epochs = 0
        if self.is_better(value):
            self.best = value
            self.num_bad_epochs = 0
            return None
        if self.cooldown_counter > 0 or not counts:
            return None
        self.num_bad_epochs += 1
        if self.num_bad_epochs < c.patience:
            return None
        old = self.factor
        if not scheduled_lr * old > c.min_lr:
            return None  # Keras leaves the count running when the LR is already at min_lr
        bad = self.num_bad_epochs
        new = old * c.factor
        if scheduled_lr > 0:
            new = max(new, c.min_lr / scheduled_lr)
        self.cooldown_counter = c.cooldown
        self.num_bad_epochs = 0
        if new >= old:  # clamped at min_lr; Keras has no minimum step (torch style's eps), so any drop counts
            return None
        self.factor = new
        self.num_reductions += 1
        return (f"plateau: {c.metric} has not improved for {bad} epochs (best {self.best:.4g}); "
                f"LR {scheduled_lr * old:.2e} -> {scheduled_lr * new:.2e}")

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "num_bad_epochs": self.num_bad_epochs, "cooldown_counter": self.cooldown_counter,
                "factor": self.factor, "num_reductions": self.num_reductions, "last_epoch": self.last_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("best", "num_bad_epochs", "cooldown_counter", "factor", "num_reductions", "last_epoch"):
            setattr(self, key, state[key])
