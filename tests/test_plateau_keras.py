"""Keras-style plateau against a transcription of Keras' ReduceLROnPlateau, and epoch granularity."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from launcher.config import PlateauConfig, ScheduleConfig, load_config
from launcher.errors import UsageError
from launcher.schedule import LRScheduler, preview

ROOT_RECIPE = "recipes/mnist1d_writeup.yaml"


class KerasReduceLROnPlateau:
    """keras/src/callbacks/reduce_lr_on_plateau.py, transcribed: `_reset`, `on_epoch_end`, `in_cooldown`,
    with the optimizer's learning rate as a plain attribute."""

    def __init__(self, lr, mode="min", factor=0.1, patience=10, min_delta=1e-4, cooldown=0, min_lr=0.0):
        self.lr = lr
        self.factor, self.patience, self.min_delta = factor, patience, min_delta
        self.cooldown, self.min_lr = cooldown, min_lr
        if mode == "min":
            self.monitor_op = lambda a, b: np.less(a, b - self.min_delta)
            self.best = np.inf
        else:
            self.monitor_op = lambda a, b: np.greater(a, b + self.min_delta)
            self.best = -np.inf
        self.cooldown_counter = 0
        self.wait = 0

    def on_epoch_end(self, current):
        if self.in_cooldown():
            self.cooldown_counter -= 1
            self.wait = 0
        if self.monitor_op(current, self.best):
            self.best = current
            self.wait = 0
        elif not self.in_cooldown():
            self.wait += 1
            if self.wait >= self.patience:
                old_lr = float(self.lr)
                if old_lr > np.float32(self.min_lr):
                    new_lr = old_lr * self.factor
                    new_lr = max(new_lr, self.min_lr)
                    self.lr = new_lr
                    self.cooldown_counter = self.cooldown
                    self.wait = 0

    def in_cooldown(self):
        return self.cooldown_counter > 0


def _keras_scheduler(**plateau) -> LRScheduler:
    cfg = ScheduleConfig(plateau=PlateauConfig(enabled=True, style="keras", metric="val/loss", **plateau))
    return LRScheduler(None, cfg, [1.0], 0, 1, 10_000)


def _compare(values, mode, factor, patience, min_delta, cooldown, min_lr) -> tuple[list[float], list[float]]:
    ref = KerasReduceLROnPlateau(1.0, mode=mode, factor=factor, patience=patience, min_delta=min_delta,
                                 cooldown=cooldown, min_lr=min_lr)
    ours = _keras_scheduler(mode=mode, factor=factor, patience=patience, min_delta=min_delta, cooldown=cooldown,
                            min_lr=min_lr)
    got, want = [], []
    for epoch, value in enumerate(values, start=1):
        ours.apply(ours.next_step + 1)
        ours.end_epoch(epoch, {"val/loss": value})
        ref.on_epoch_end(value)
        got.append(ours.get_last_lr()[0])
        want.append(ref.lr)
    return got, want


def test_keras_reduces_after_patience_bad_epochs_and_torch_after_one_more():
    values = [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]  # epoch 1 sets best, then bad epochs 2, 3, 4, ...
    got, want = _compare(values, "min", 0.5, 3, 0.0, 0, 0.0)
    assert got == want == [1.0, 1.0, 1.0, 0.5, 0.5, 0.5]
    torch_style = LRScheduler(None, ScheduleConfig(plateau=PlateauConfig(enabled=True, patience=3, cooldown=0)),
                              [1.0], 0, 1, 100)
    lrs = []
    for epoch, value in enumerate(values, start=1):
        torch_style.apply(torch_style.next_step + 1)
        torch_style.end_epoch(epoch, {"val/loss": value})
        lrs.append(torch_style.get_last_lr()[0])
    assert lrs == [1.0, 1.0, 1.0, 1.0, 0.5, 0.5]


def test_keras_cooldown_two_ignores_one_epoch():
    # patience 1, cooldown 2: reduction at epoch 2; epoch 3 is in cooldown; epoch 4 ends the cooldown and
    # already counts as bad, so the next reduction comes at epoch 4 (torch's cooldown 2 would wait longer).
    got, want = _compare([1.0] * 6, "min", 0.5, 1, 0.0, 2, 0.0)
    assert got == want == [1.0, 0.5, 0.5, 0.25, 0.25, 0.125]


def test_keras_min_delta_is_absolute():
    # 1.0 -> 0.9995 improves by 5e-4: an improvement for min_delta 1e-4 (absolute), whatever the scale.
    got, _ = _compare([1000.0, 999.9995, 999.999], "min", 0.5, 1, 1e-4, 0, 0.0)
    assert got == [1.0, 1.0, 1.0]
    got, want = _compare([1000.0, 999.99995], "min", 0.5, 1, 1e-4, 0, 0.0)
    assert got == want == [1.0, 0.5]


@settings(max_examples=300, deadline=None)
@given(values=st.lists(st.one_of(st.floats(0.0, 2.0), st.sampled_from([0.5, 1.0, math.nan])), min_size=1,
                       max_size=40),
       mode=st.sampled_from(["min", "max"]), factor=st.sampled_from([0.1, 0.5, 0.8]),
       patience=st.integers(0, 4), min_delta=st.sampled_from([0.0, 1e-4, 0.05, 0.3]),
       cooldown=st.integers(0, 3), min_lr=st.sampled_from([0.0, 0.2, 0.05]))
def test_keras_style_matches_transcribed_keras(values, mode, factor, patience, min_delta, cooldown, min_lr):
    got, want = _compare(values, mode, factor, patience, min_delta, cooldown, min_lr)
    assert got == pytest.approx(want, rel=1e-9, abs=1e-12)


def test_keras_style_rejects_torch_threshold_and_the_reverse():
    with pytest.raises(UsageError, match="min_delta"):
        load_config(None, {"schedule.plateau.style": "keras", "schedule.plateau.threshold": 0.01})
    with pytest.raises(UsageError, match="style=keras"):
        load_config(None, {"schedule.plateau.min_delta": 0.01})
    with pytest.raises(UsageError, match="schedule.plateau.style: must be one of torch, keras"):
        load_config(None, {"schedule.plateau.style": "tf"})


def test_keras_state_round_trip_mid_cooldown():
    sched = _keras_scheduler(patience=1, cooldown=3, factor=0.5)
    for epoch in range(1, 4):
        sched.apply(sched.next_step + 1)
        sched.end_epoch(epoch, {"val/loss": 1.0})
    resumed = _keras_scheduler(patience=1, cooldown=3, factor=0.5)
    resumed.load_state_dict(sched.state_dict())
    resumed.apply(sched.next_step)
    for epoch in range(4, 12):
        for s in (sched, resumed):
            s.apply(s.next_step + 1)
            s.end_epoch(epoch, {"val/loss": 1.0})
        assert resumed.get_last_lr() == sched.get_last_lr()


# ---------------------------------------------------------------------------------------------
# Epoch granularity: the write-up's Keras callbacks
# ---------------------------------------------------------------------------------------------


def test_epoch_granularity_is_constant_within_an_epoch_and_follows_the_formula():
    cfg = ScheduleConfig(granularity="epoch", warmup_epochs=3, decay="exponential", decay_rate=0.96)
    spe, epochs = 7, 12
    steps = preview(cfg, 5e-3, 3 * spe, spe, spe * epochs)["steps"]
    for e in range(1, epochs + 1):
        in_epoch = steps[(e - 1) * spe: e * spe]
        assert len(set(in_epoch)) == 1, f"epoch {e}"
        expected = 5e-3 * e / 3 if e <= 3 else 5e-3 * 0.96 ** (e - 3)
        assert in_epoch[0] == pytest.approx(expected, rel=1e-12), f"epoch {e}"


def test_epoch_granularity_needs_whole_warmup_epochs_and_step_free_decay():
    with pytest.raises(UsageError, match="schedule.warmup_epochs: must be a whole number"):
        load_config(None, {"schedule.granularity": "epoch", "schedule.warmup_epochs": 1.5})
    with pytest.raises(UsageError, match="schedule.granularity: epoch granularity supports"):
        load_config(None, {"schedule.granularity": "epoch", "schedule.decay": "cosine"})
    with pytest.raises(UsageError, match="not warmup_steps"):
        load_config(None, {"schedule.granularity": "epoch", "schedule.warmup_steps": 10})


def test_writeup_recipe_preview_prints_the_writeup_warmup(capsys):
    from launcher.schedule import main

    main(recipe=ROOT_RECIPE, steps_per_epoch=125)
    out = capsys.readouterr().out
    assert "Epoch 1: 0.001667 (warmup)" in out
    assert "Epoch 2: 0.003333 (warmup)" in out
    assert "Epoch 3: 0.005 (warmup)" in out
    assert "Epoch 4: 0.0048 (exponential per epoch)" in out
    assert "Epoch 20: 0.002498 " in out and "Epoch 30: 0.001661 " in out
    assert "keras style" in out
