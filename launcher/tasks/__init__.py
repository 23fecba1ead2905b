"""Tasks: what to train (model, data, loss, metrics), kept apart from how to train it.

A task is a function `build(task: TaskConfig, data: DataConfig) -> Task`. Built-ins are named
(`task.name: mnist1d`); your own is `task.name: my_pkg.my_module:build` (importable from the
current directory or the Python path). See README "Bring your own task".

A task's `task.options` are declared as a `@task_options` class (a frozen pydantic dataclass, like
the recipe's sections) and read with `parse_options(Options, task)`, which converts the values as
the config does and turns any mistake into one line naming `task.options.<key>`.
`python -m launcher.tasks` prints the built-ins' options (`options_table`).
"""

from __future__ import annotations

import difflib
import importlib
import json
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import ValidationError

from launcher import config_cli
from launcher.config_cli import BadValue, convert, problem, section, setting
from launcher.errors import UsageError

if TYPE_CHECKING:
    import torch
    from torch import nn
    from torch.utils.data import Dataset

    from launcher.config import DataConfig, TaskConfig

__all__ = ["BUILTIN", "BUILTIN_OPTIONS", "Task", "build_task", "builtin_options", "check_options", "data_root", "options_table",
           "parse_options", "problem", "resolve", "setting", "task_options"]

BUILTIN = {
    "mnist1d": "launcher.tasks.mnist1d:build",
    "cifar10": "launcher.tasks.cifar10:build",
    "gpt": "launcher.tasks.gpt:build",
}
BUILTIN_OPTIONS = {
    "mnist1d": "launcher.tasks.mnist1d:MNIST1DOptions",
    "cifar10": "launcher.tasks.cifar10:CIFAR10Options",
    "gpt": "launcher.tasks.gpt:GPTOptions",
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


# ---------------------------------------------------------------------------------------------
# Task options
# ---------------------------------------------------------------------------------------------

T = TypeVar("T")

_UNKNOWN = ("extra_forbidden", "unexpected_keyword_argument")


def task_options(cls: type[T]) -> type[T]:
    """Declare a task's options (`task.options`) like a recipe section.

    A frozen pydantic dataclass that refuses unknown keys; each field's docstring is its description
    and its `Field` / `setting` constraints (ge, gt, le, lt, ...) its allowed values. Cross-field
    checks are `pydantic.model_validator`s raising `launcher.config_cli.problem(message, ".field")`.
    """
    return section(cls)


def option_fields(model: type) -> dict[str, Any]:
    """The pydantic FieldInfo of each option of `model`, in declaration order."""
    fields = getattr(model, "__pydantic_fields__", None)
    if fields is None:
        raise TypeError(f"{model!r} is not a pydantic model or dataclass; declare it with @launcher.tasks.task_options")
    return fields


def parse_options(model: type[T], task: TaskConfig) -> T:
    """The recipe's `task.options`, validated into an instance of `model` (a `@task_options` class).

    Values are converted as every recipe value is (`launcher.config_cli.convert`: '512' -> 512,
    'true' -> True, `30.0` -> 30), so `--task.options.num_train=512` works. Any mistake is a
    one-line UsageError naming `task.options.<key>`: an unknown key (with the closest option
    suggested), a value of the wrong type, one out of range (with the allowed range), a missing
    required option or a failed cross-field check.
    """
    return _parse(model, task.options, task.name)


def _parse(model: type[T], options: Any, task_name: str) -> T:
    fields = option_fields(model)
    values = _convert(options, {key: info.annotation for key, info in fields.items()}, task_name)
    try:
        return model(**values)
    except ValidationError as err:
        raise _options_error(err, model, task_name) from None


def _convert(options: Any, types: dict[str, Any], task_name: str) -> dict[str, Any]:
    """The given options converted to their types by the config layer's rules; unknown keys refused."""
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise UsageError(f"task.options: expected a mapping of option: value for task {task_name}; got {options!r}")
    values: dict[str, Any] = {}
    for key, value in options.items():
        if key not in types:
            raise _unknown(str(key), list(types), task_name)
        try:
            values[key] = convert(value, types[key])
        except BadValue as err:
            raise UsageError(f"task.options.{key}{err.at}: {err}") from None
        except AssertionError:  # a type the config layer does not convert: pydantic validates it as given
            values[key] = value
    return values


def _unknown(key: str, fields: list[str], task_name: str) -> UsageError:
    close = difflib.get_close_matches(key, fields, n=1)
    if close:
        hint = f"; did you mean task.options.{close[0]}?"
    elif fields:
        hint = f"; {task_name} accepts {', '.join(fields)}"
    else:
        hint = f"; {task_name} takes no options"
    return UsageError(f"unknown option task.options.{key} for task {task_name}{hint}")


def _options_error(err: ValidationError, model: type, task_name: str) -> UsageError:
    """The first problem in `err` as one line naming `task.options.<key>` (the recipe's error style)."""
    e = err.errors()[0]
    loc = ".".join(str(p) for p in e["loc"])
    key = f"task.options.{loc}" if loc else "task.options"
    if e["type"] in _UNKNOWN:
        return _unknown(loc, list(option_fields(model)), task_name)
    if e["type"] in ("missing", "missing_argument"):
        return UsageError(f"{key}: task {task_name} needs this option; set it in the recipe (task: options: "
                          f"{{{loc}: ...}}) or with --{key}=VALUE")
    return config_cli.value_problem(e, model, key, "task.options")


def check_options(task_name: str, options: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """`task.options` merged over a dict of defaults (each default's type is the option's type).

    The short form of `parse_options` for a few untyped options, with the same conversions and
    messages; it returns a dict. Prefer a `@task_options` class (descriptions, bounds).
    """
    types = {key: type(value) if value is not None else Any for key, value in defaults.items()}
    return {**defaults, **_convert(options, types, task_name)}


def _allowed(info: Any) -> str:
    """The values a field allows, in words (`>= 1`, `in [0, 1)`, `one of a, b`), or "" when only its type says."""
    bounded = typing.get_origin(info.annotation) is typing.Literal or any(
        hasattr(m, b) for m in info.metadata for b in ("gt", "ge", "lt", "le"))
    if not bounded:
        return ""
    return config_cli.expected(info).removeprefix("must be ")


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is typing.Literal:
        return " \\| ".join(str(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _default(info: Any) -> str:
    if info.is_required():
        return "required"
    value = info.get_default(call_default_factory=True)
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    return f"`{json.dumps(value)}`" if isinstance(value, str) else f"`{value}`"


def options_table(model: type) -> str:
    """A Markdown table of a task's options: key, type, default, allowed values, description (the docstring)."""
    rows = ["| option | type | default | allowed | description |", "|---|---|---|---|---|"]
    for name, info in option_fields(model).items():
        description = " ".join((info.description or "").split()).replace("|", "\\|")
        rows.append(f"| `{name}` | {_type_name(info.annotation)} | {_default(info)} | {_allowed(info)} | {description} |")
    return "\n".join(rows)


def builtin_options() -> dict[str, type]:
    """Each built-in task's options class (imports the task modules, hence torch)."""
    out = {}
    for name, target in BUILTIN_OPTIONS.items():
        module_name, class_name = target.split(":", 1)
        out[name] = getattr(importlib.import_module(module_name), class_name)
    return out


def data_root(data_cfg: DataConfig) -> str:
    """Where datasets are cached: data.root, else $LAUNCHER_DATA, else ~/.cache/launcher."""
    import os

    if data_cfg.root:
        return os.path.expanduser(data_cfg.root)
    return os.environ.get("LAUNCHER_DATA") or os.path.join(os.path.expanduser("~"), ".cache", "launcher")
