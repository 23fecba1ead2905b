"""Tasks: what to train (model, data, loss, metrics), kept apart from how to train it.

A task is a function `build(task: TaskConfig, data: DataConfig) -> Task`. Built-ins are named
(`task.name: mnist1d`); your own is `task.name: my_pkg.my_module:build` (importable from the
current directory or the Python path). See README "Bring your own task".
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from launcher.errors import UsageError

if TYPE_CHECKING:
    import torch
    from torch import nn
    from torch.utils.data import Dataset

    from launcher.config import DataConfig, TaskConfig

BUILTIN = {
    "mnist1d": "launcher.tasks.mnist1d:build",
    "cifar10": "launcher.tasks.cifar10:build",
    "gpt": "launcher.tasks.gpt:build",
}


@dataclass
class Task:
    """Everything the trainer needs to know about a workload.

    A batch is whatever the train/val datasets' items collate to (or `collate_fn` returns); the
    trainer moves it to the device and calls `model(inputs)` where `inputs, targets = split(batch)`.
    """

    model: nn.Module
    train_set: Dataset
    """Random choices while loading (augmentation, crops, noise) come from its `sample_random`, a
    `launcher.data.SampleRandom` the trainer keeps on (train.seed, epoch): exact resume, any process count."""
    val_set: Dataset
    loss: Callable[[Any, Any], torch.Tensor]
    """(outputs, targets) -> scalar mean loss used for training."""
    metrics: Callable[[Any, Any], dict[str, torch.Tensor]]
    """(outputs, targets) -> per-sample values, each of shape [batch], e.g. {"loss": ..., "accuracy": ...}.
    Evaluation averages them over the whole validation set on all ranks and logs them as val/<name>."""
    split: Callable[[Any], tuple[Any, Any]] = field(default=lambda batch: (batch[0], batch[1]))
    collate_fn: Callable | None = None
    finalize: Callable[[dict[str, float]], dict[str, float]] | None = None
    """Optional: derive more metrics from the averaged ones (e.g. perplexity = exp(loss))."""
    tokens_per_sample: int = 0
    """For sequence models: tokens in one training sample (enables tokens/s and MFU)."""
    flops_per_token: float = 0.0
    """For sequence models: training FLOPs per token (6N + attention), for MFU."""
    description: str = ""


def resolve(name: str) -> Callable[..., Task]:
    """Find the build function for `task.name` (built-in name or `module:function`)."""
    target = BUILTIN.get(name, name)
    if ":" not in target:
        raise UsageError(
            f"task.name: unknown task {name!r}; use one of {', '.join(sorted(BUILTIN))} "
            "or 'package.module:function' for your own")
    module_name, func_name = target.split(":", 1)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name and module_name.startswith(err.name):
            raise UsageError(
                f"task.name: cannot import module {module_name!r}; run from the directory that holds it "
                "or add it to PYTHONPATH") from None
        raise
    fn = getattr(module, func_name, None)
    if not callable(fn):
        raise UsageError(f"task.name: {module_name!r} has no function {func_name!r}")
    return fn


def build_task(task_cfg: TaskConfig, data_cfg: DataConfig) -> Task:
    task = resolve(task_cfg.name)(task_cfg, data_cfg)
    if not isinstance(task, Task):
        raise UsageError(f"task.name: {task_cfg.name!r} returned {type(task).__name__}, expected launcher.tasks.Task")
    return task


def check_options(task_name: str, options: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """Merge `task.options` over a task's defaults, rejecting unknown keys and coercing types."""
    import difflib

    from launcher.config import _coerce

    out = dict(defaults)
    for key, value in options.items():
        if key not in defaults:
            close = difflib.get_close_matches(key, list(defaults), n=1)
            hint = f"; did you mean task.options.{close[0]}?" if close else f"; {task_name} accepts {', '.join(defaults)}"
            raise UsageError(f"unknown option task.options.{key} for task {task_name}{hint}")
        default = defaults[key]
        tp = type(default) if default is not None else Any
        out[key] = _coerce(value, tp, f"task.options.{key}")
    return out


def data_root(data_cfg: DataConfig) -> str:
    """Where datasets are cached: data.root, else $LAUNCHER_DATA, else ~/.cache/launcher."""
    import os

    if data_cfg.root:
        return os.path.expanduser(data_cfg.root)
    return os.environ.get("LAUNCHER_DATA") or os.path.join(os.path.expanduser("~"), ".cache", "launcher")
