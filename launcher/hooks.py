"""Hooks: code of your own that the trainer calls at named points, without touching the loop.

A hook is an object with any of these methods (subclass `Hook` and override what you need; the
trainer calls only the methods a hook overrides, so an unused point costs nothing):

    on_train_start(trainer)            every rank, before the first step (after a resume is loaded)
    on_epoch_start(trainer)            every rank, before an epoch's first (or first resumed) step
    on_loss(trainer, loss, step)       every rank, every micro-batch: may return a replacement loss;
                                       `step` is the 1-based optimizer step the micro-batch belongs to
    after_step(trainer)                every rank, after optimizer step `trainer.state.step`
    on_flush(trainer, rows)            every rank, after the metric rows since the last flush were read
                                       back (every `train.log_every_n_steps` steps and at epoch ends)
    on_save(trainer, step, path)       main process, while checkpoint `step` is half written in `path`
    on_epoch_end(trainer, metrics)     every rank, after evaluation and the plateau step
    on_finish(trainer, summary)        every rank, after summary.json is written

Keep hooks off the device: a `.item()` in `after_step` is a host sync on every step.

Hooks come from `train.hooks` in the recipe and from $LAUNCHER_HOOKS (comma-separated), each
`package.module:name`, where `name` is a Hook class (instantiated without arguments), a function
returning a hook or a list of hooks, or a hook object. The environment variable adds hooks (e.g. a
profiler or fault injection in tests) without changing the recipe that is saved with the run.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Iterable
from typing import Any

from launcher.errors import UsageError

EVENTS = ("on_train_start", "on_epoch_start", "on_loss", "after_step", "on_flush", "on_save", "on_epoch_end", "on_finish")


class Hook:
    """Base class: every method does nothing. Override the points you need."""

    def on_train_start(self, trainer) -> None:
        pass

    def on_epoch_start(self, trainer) -> None:
        pass

    def on_loss(self, trainer, loss, step: int):
        return loss

    def after_step(self, trainer) -> None:
        pass

    def on_flush(self, trainer, rows: list[dict[str, Any]]) -> None:
        pass

    def on_save(self, trainer, step: int, path: str) -> None:
        pass

    def on_epoch_end(self, trainer, metrics: dict[str, float]) -> None:
        pass

    def on_finish(self, trainer, summary: dict[str, Any]) -> None:
        pass


def _load_one(spec: str, source: str) -> list[Any]:
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"{source}: {spec!r} is not 'package.module:name'; e.g. my_hooks:Timer")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UsageError(f"{source}: cannot import {module_name!r} ({e}); is it on PYTHONPATH?") from None
    if not hasattr(module, attr):
        raise UsageError(f"{source}: module {module_name!r} has no {attr!r}")
    obj = getattr(module, attr)
    if isinstance(obj, type) or (callable(obj) and not any(hasattr(obj, e) for e in EVENTS)):
        obj = obj()  # a Hook class, or a function that makes the hook(s)
    hooks = list(obj) if isinstance(obj, list | tuple) else [obj]
    for h in hooks:
        if not any(callable(getattr(h, e, None)) for e in EVENTS):
            raise UsageError(f"{source}: {spec} gave {type(h).__name__}, which has none of the hook methods "
                             f"({', '.join(EVENTS)})")
    return hooks


def load_hooks(recipe_specs: Iterable[str] = (), env: str | None = None) -> list[Any]:
    """The hooks named in the recipe, then those in $LAUNCHER_HOOKS."""
    hooks: list[Any] = []
    for spec in recipe_specs:
        hooks += _load_one(spec.strip(), "train.hooks")
    env = os.environ.get("LAUNCHER_HOOKS", "") if env is None else env
    for spec in filter(None, (s.strip() for s in env.split(","))):
        hooks += _load_one(spec, "LAUNCHER_HOOKS")
    return hooks


class Hooks:
    """Dispatch to the hooks that override each point; `hooks.after_step(trainer)` etc."""

    def __init__(self, hooks: Iterable[Any]):
        self.hooks = list(hooks)
        for event in EVENTS:
            setattr(self, "_" + event, [getattr(h, event) for h in self.hooks if _overrides(h, event)])

    def __bool__(self) -> bool:
        return bool(self.hooks)

    def has(self, event: str) -> bool:
        return bool(getattr(self, "_" + event))

    def on_train_start(self, trainer) -> None:
        for fn in self._on_train_start:
            fn(trainer)

    def on_epoch_start(self, trainer) -> None:
        for fn in self._on_epoch_start:
            fn(trainer)

    def on_loss(self, trainer, loss, step: int):
        for fn in self._on_loss:
            out = fn(trainer, loss, step)
            loss = loss if out is None else out
        return loss

    def after_step(self, trainer) -> None:
        for fn in self._after_step:
            fn(trainer)

    def on_flush(self, trainer, rows) -> None:
        for fn in self._on_flush:
            fn(trainer, rows)

    def on_save(self, trainer, step: int, path: str) -> None:
        for fn in self._on_save:
            fn(trainer, step, path)

    def on_epoch_end(self, trainer, metrics) -> None:
        for fn in self._on_epoch_end:
            fn(trainer, metrics)

    def on_finish(self, trainer, summary) -> None:
        for fn in self._on_finish:
            fn(trainer, summary)


def _overrides(hook: Any, event: str) -> bool:
    fn: Callable | None = getattr(hook, event, None)
    if not callable(fn):
        return False
    base = getattr(Hook, event)
    return getattr(type(hook), event, None) is not base
