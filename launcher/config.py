"""The recipe: one frozen dataclass tree, loaded from YAML plus dotted CLI overrides.

Precedence is CLI > YAML > defaults. Every key is checked: unknown keys (with the closest valid key
suggested), values of the wrong type and impossible values raise `UsageError` naming the dotted key,
which the entry points turn into one line and exit status 2. Nothing here touches torch, so
`--help` and config errors stay fast.

Derived values (world size, global batch, scaled LR, steps per epoch, warmup steps) never go back
into the config: they live in `launcher.plan.Plan`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from launcher.errors import UsageError


class _FieldError(ValueError):
    """Raised inside `__post_init__`; the loader prefixes the dotted path of the section."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise _FieldError(key, message)


def _choice(value: str, key: str, choices: tuple[str, ...]) -> None:
    _require(value in choices, key, f"must be one of {', '.join(choices)}; got {value!r}")


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskConfig:
    name: str = "mnist1d"
    """A built-in task (`mnist1d`, `cifar10`, `gpt`) or `package.module:function` for your own."""
    model: str = ""
    """Model variant understood by the task (e.g. mnist1d: `cnn`, `mlp`, `linear`); empty = task default."""
    options: dict[str, Any] = field(default_factory=dict)
    """Task-specific settings, validated by the task itself (e.g. gpt: `n_layer`, `block_size`)."""

    def __post_init__(self) -> None:
        _require(bool(self.name.strip()), "name", "must name a task, e.g. mnist1d or my_pkg.my_module:build")


@dataclass(frozen=True)
class DataConfig:
    root: str = ""
    """Where datasets are cached or already present; empty = $LAUNCHER_DATA or ~/.cache/launcher."""
    num_workers: int = 0
    """DataLoader worker processes (0 = load in the training process; best for small in-memory data)."""
    pin_memory: bool = True
    """Pin host memory for faster host-to-GPU copies (ignored without a GPU)."""
    val_batch_size: int = 0
    """Per-device batch size for evaluation; 0 = 4 x train.batch_size."""

    def __post_init__(self) -> None:
        _require(self.num_workers >= 0, "num_workers", f"must be >= 0; got {self.num_workers}")
        _require(self.val_batch_size >= 0, "val_batch_size", f"must be >= 0; got {self.val_batch_size}")


@dataclass(frozen=True)
class OptimConfig:
    name: str = "adamw"
    """`adamw` (decoupled weight decay), `adam` (L2 penalty added to the gradient, torch.optim.Adam) or `sgd`."""
    lr: float = 1e-3
    """Base learning rate at `reference_batch_size` (before warmup, decay and plateau factors)."""
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    momentum: float = 0.9
    """Only for `sgd`."""
    weight_decay: float = 0.0
    decay_norm_and_bias: bool = False
    """Apply weight decay to biases and normalisation weights too (off: they are excluded)."""
    clip_grad_norm: float = 0.0
    """Clip gradients to this global L2 norm; 0 = no clipping (the norm is still measured and logged)."""
    lr_scaling: str = "none"
    """Scale `lr` with the global batch: `none`, `linear` (Goyal et al. 2017) or `sqrt`."""
    reference_batch_size: int = 0
    """The global batch `lr` was tuned for; required when lr_scaling is not `none`."""
    fused: bool = True
    """Use the fused AdamW/Adam/SGD kernel (CPU, CUDA): it also skips a non-finite update on the device,
    without a host sync (launcher.nonfinite). false: the foreach kernel and one host read per step."""

    def __post_init__(self) -> None:
        _choice(self.name, "name", ("adamw", "adam", "sgd"))
        _require(math.isfinite(self.lr) and self.lr > 0, "lr", f"must be a positive number; got {self.lr}")
        _require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas",
                 f"must be two numbers in [0, 1); got {list(self.betas)}")
        _require(self.eps > 0, "eps", f"must be > 0; got {self.eps}")
        _require(0 <= self.momentum < 1, "momentum", f"must be in [0, 1); got {self.momentum}")
        _require(self.weight_decay >= 0, "weight_decay", f"must be >= 0; got {self.weight_decay}")
        _require(self.clip_grad_norm >= 0, "clip_grad_norm", f"must be >= 0 (0 = off); got {self.clip_grad_norm}")
        _choice(self.lr_scaling, "lr_scaling", ("none", "linear", "sqrt"))
        _require(self.reference_batch_size >= 0, "reference_batch_size",
                 f"must be >= 0; got {self.reference_batch_size}")
        _require(self.lr_scaling == "none" or self.reference_batch_size > 0, "reference_batch_size",
                 f"must be set (> 0) when optim.lr_scaling={self.lr_scaling}: the global batch optim.lr was tuned for")


@dataclass(frozen=True)
class PlateauConfig:
    enabled: bool = False
    metric: str = "val/loss"
    """A validation metric (averaged over the whole validation set on all ranks)."""
    style: str = "torch"
    """`torch`: torch's ReduceLROnPlateau (reduce after `patience + 1` bad epochs, relative `threshold`);
    `keras`: Keras' ReduceLROnPlateau (reduce after `patience` bad epochs, absolute `min_delta`, cooldown
    as Keras counts it). See docs/schedule.md."""
    mode: str = "min"
    """`min` if lower is better (loss), `max` if higher is better (accuracy)."""
    factor: float = 0.5
    """Multiply the LR by this on a plateau."""
    patience: int = 3
    """Epochs without improvement tolerated; the LR drops after `patience + 1` bad epochs (torch style) or
    after `patience` bad epochs (keras style)."""
    cooldown: int = 2
    """Epochs after a reduction during which bad epochs are not counted (keras style: the epoch that
    ends the cooldown counts again, so Keras' cooldown=2 ignores one epoch)."""
    threshold: float = 1e-4
    """torch style: minimum change that counts as an improvement."""
    threshold_mode: str = "rel"
    """torch style: `rel` (relative to the best value) or `abs` (absolute)."""
    min_delta: float = 0.0
    """keras style: minimum absolute change that counts as an improvement (Keras' `min_delta`)."""
    min_lr: float = 0.0
    """Plateau reductions never take the LR below this."""

    def __post_init__(self) -> None:
        _require(bool(self.metric), "metric", "must name a validation metric, e.g. val/loss")
        _choice(self.mode, "mode", ("min", "max"))
        _require(0 < self.factor < 1, "factor", f"must be in (0, 1); got {self.factor}")
        _require(self.patience >= 0, "patience", f"must be >= 0; got {self.patience}")
        _require(self.cooldown >= 0, "cooldown", f"must be >= 0; got {self.cooldown}")
        _require(self.threshold >= 0, "threshold", f"must be >= 0; got {self.threshold}")
        _choice(self.threshold_mode, "threshold_mode", ("rel", "abs"))
        _require(self.min_lr >= 0, "min_lr", f"must be >= 0; got {self.min_lr}")
        _choice(self.style, "style", ("torch", "keras"))
        _require(math.isfinite(self.min_delta) and self.min_delta >= 0, "min_delta",
                 f"must be >= 0; got {self.min_delta}")
        _require(self.style == "keras" or self.min_delta == 0, "min_delta",
                 "is Keras' absolute threshold and needs schedule.plateau.style=keras; with the torch style "
                 "use schedule.plateau.threshold (and threshold_mode=abs)")
        _require(self.style == "torch" or (self.threshold == 1e-4 and self.threshold_mode == "rel"), "threshold",
                 "threshold and threshold_mode are torch's; with schedule.plateau.style=keras set "
                 "schedule.plateau.min_delta (absolute) instead")


@dataclass(frozen=True)
class ScheduleConfig:
    warmup_steps: int = 0
    """Linear warmup length in optimizer steps (after gradient accumulation)."""
    warmup_epochs: float = 0.0
    """Alternative to warmup_steps: converted with the real steps per epoch (set one, not both)."""
    warmup_start_factor: float = 0.0
    """Warmup ramps from base_lr x this (reached before step 1) to base_lr at the last warmup step."""
    granularity: str = "step"
    """`step`: the LR changes every optimizer step. `epoch`: it changes only at epoch starts, as Keras
    callbacks set it: epoch e (1-based) uses base x e / warmup_epochs during warmup, then
    base x decay_rate ** (e - warmup_epochs) (needs whole warmup_epochs; decay constant or exponential)."""
    decay: str = "constant"
    """After warmup: `constant`, `exponential` (decay_rate per epoch), `cosine` or `linear` (to min_lr at the end)."""
    decay_rate: float = 1.0
    """For `exponential`: the LR is multiplied by this once per epoch."""
    staircase: bool = False
    """For `exponential`: change the LR only at epoch boundaries instead of smoothly every step."""
    min_lr: float = 0.0
    """Floor for the decayed LR (warmup may start below it)."""
    plateau: PlateauConfig = field(default_factory=PlateauConfig)

    def __post_init__(self) -> None:
        _require(self.warmup_steps >= 0, "warmup_steps", f"must be >= 0; got {self.warmup_steps}")
        _require(self.warmup_epochs >= 0, "warmup_epochs", f"must be >= 0; got {self.warmup_epochs}")
        _require(not (self.warmup_steps and self.warmup_epochs), "warmup_epochs",
                 "set schedule.warmup_steps or schedule.warmup_epochs, not both")
        _require(0 <= self.warmup_start_factor <= 1, "warmup_start_factor",
                 f"must be in [0, 1]; got {self.warmup_start_factor}")
        _choice(self.decay, "decay", ("constant", "exponential", "cosine", "linear"))
        _require(0 < self.decay_rate <= 1, "decay_rate", f"must be in (0, 1]; got {self.decay_rate}")
        _choice(self.granularity, "granularity", ("step", "epoch"))
        if self.granularity == "epoch":
            _require(self.decay in ("constant", "exponential"), "granularity",
                     f"epoch granularity supports decay constant or exponential; got decay {self.decay}")
            _require(not self.warmup_steps, "granularity",
                     "epoch granularity counts warmup in epochs: set schedule.warmup_epochs, not warmup_steps")
            _require(float(self.warmup_epochs).is_integer(), "warmup_epochs",
                     f"must be a whole number of epochs with granularity epoch; got {self.warmup_epochs}")
        _require(self.min_lr >= 0, "min_lr", f"must be >= 0; got {self.min_lr}")


@dataclass(frozen=True)
class TrainConfig:
    num_epochs: int = 10
    max_steps: int = 0
    """Stop after this many optimizer steps (0 = run all num_epochs)."""
    batch_size: int = 32
    """Per-device micro-batch size. Global batch = batch_size x processes x grad_accum_steps."""
    grad_accum_steps: int = 1
    seed: int = 0
    mixed_precision: str = "auto"
    """`no`, `bf16`, `fp16`, or `auto` (what the accelerate config / launcher says, else `no`)."""
    eval_every_n_epochs: int = 1
    compile: bool = False
    """torch.compile the model."""
    channels_last: bool = False
    """Use channels_last memory format (convnets on GPU)."""
    deterministic: bool = False
    """torch.use_deterministic_algorithms(True) (slower; bitwise-reproducible kernels)."""
    on_nonfinite: str = "stop"
    """What to do when the loss or gradients are NaN/inf on any rank: `skip` the step or `stop`."""
    max_nonfinite_skips: int = 10
    """With on_nonfinite=skip: stop after this many consecutive skipped steps."""
    progress_bar: str = "auto"
    """`auto` (a bar when stderr is a terminal, else a line per epoch), `on` or `off`."""
    peak_tflops: float = 0.0
    """Peak dense TFLOP/s of one device for MFU (model FLOPs utilisation); 0 = known GPUs' bf16 peak, else no MFU."""
    log_every_n_steps: int = 25
    """Read the step rows back (one host sync, one all-reduce) every N optimizer steps. Non-finite
    stops and a preemption signal under several processes are acted on at these reads (and before
    each checkpoint), so within N steps; metrics.jsonl still gets one row per step."""
    hooks: list[str] = field(default_factory=list)
    """Extra hooks, `package.module:name` each (launcher.hooks); $LAUNCHER_HOOKS adds more."""

    def __post_init__(self) -> None:
        _require(self.num_epochs >= 1, "num_epochs", f"must be >= 1; got {self.num_epochs}")
        _require(self.max_steps >= 0, "max_steps", f"must be >= 0 (0 = no cap); got {self.max_steps}")
        _require(self.batch_size >= 1, "batch_size", f"must be >= 1; got {self.batch_size}")
        _require(self.grad_accum_steps >= 1, "grad_accum_steps", f"must be >= 1; got {self.grad_accum_steps}")
        _require(self.seed >= 0, "seed", f"must be >= 0; got {self.seed}")
        _choice(self.mixed_precision, "mixed_precision", ("auto", "no", "bf16", "fp16"))
        _require(self.eval_every_n_epochs >= 1, "eval_every_n_epochs", f"must be >= 1; got {self.eval_every_n_epochs}")
        _choice(self.on_nonfinite, "on_nonfinite", ("skip", "stop"))
        _require(self.max_nonfinite_skips >= 1, "max_nonfinite_skips", f"must be >= 1; got {self.max_nonfinite_skips}")
        _choice(self.progress_bar, "progress_bar", ("auto", "on", "off"))
        _require(self.peak_tflops >= 0, "peak_tflops", f"must be >= 0 (0 = auto); got {self.peak_tflops}")
        _require(self.log_every_n_steps >= 1, "log_every_n_steps", f"must be >= 1; got {self.log_every_n_steps}")


@dataclass(frozen=True)
class CheckpointConfig:
    enabled: bool = True
    every_n_steps: int = 0
    """Also checkpoint every N optimizer steps (0 = only at the end of each epoch)."""
    keep_last: int = 2
    """How many of the most recent checkpoints to keep (the best is kept in addition)."""
    keep_best: bool = True
    best_metric: str = "val/loss"
    best_mode: str = "min"
    signal: str = "SIGUSR1"
    """Preemption signal (besides SIGTERM): finish the step, checkpoint, exit with status 124."""

    def __post_init__(self) -> None:
        _require(self.every_n_steps >= 0, "every_n_steps", f"must be >= 0 (0 = end of epoch only); got {self.every_n_steps}")
        _require(self.keep_last >= 1, "keep_last", f"must be >= 1; got {self.keep_last}")
        _choice(self.best_mode, "best_mode", ("min", "max"))
        _require(self.signal.startswith("SIG") and self.signal.isupper(), "signal",
                 f"must be a signal name such as SIGUSR1; got {self.signal!r}")


@dataclass(frozen=True)
class WandbConfig:
    enabled: bool = False
    project: str = "launcher"
    entity: str = ""
    group: str = ""
    tags: list[str] = field(default_factory=list)
    job_type: str = "train"
    name: str = ""
    """W&B run name; empty = the run directory's name."""
    mode: str = ""
    """`online`, `offline` or `disabled`; empty = $WANDB_MODE, else online with a key, offline without."""
    dir: str = ""
    """Where W&B writes its files; empty = the run directory."""

    def __post_init__(self) -> None:
        _require(self.mode in ("", "online", "offline", "disabled"), "mode",
                 f"must be online, offline, disabled or empty (auto); got {self.mode!r}")


@dataclass(frozen=True)
class TrackingConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    tensorboard: bool = False
    targets: list[float] = field(default_factory=lambda: [0.5, 0.8, 0.9, 0.95])
    """summary.json records the epoch, step and seconds at which target_metric first reaches each."""
    target_metric: str = "val/accuracy"

    def __post_init__(self) -> None:
        _require(all(t > 0 for t in self.targets), "targets", f"must be positive numbers; got {self.targets}")


@dataclass(frozen=True)
class Config:
    name: str = ""
    """Run name, used for the default output directory; empty = the recipe file's name."""
    task: TaskConfig = field(default_factory=TaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------

_FREE_FORM = {"task.options"}  # dict fields whose keys belong to someone else (the task)


def valid_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every dotted key of the tree (leaves and sections), e.g. `optim.lr`, `schedule.plateau`."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        keys.append(key)
        if dataclasses.is_dataclass(hints[f.name]):
            keys.extend(valid_keys(hints[f.name], key + "."))
    return keys


def closest_key(key: str) -> str | None:
    """The valid dotted key most like `key` (a typo, or a leaf name given without its section)."""
    keys = valid_keys()
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    if close:
        return close[0]
    leaf = key.rsplit(".", 1)[-1]
    by_leaf = [k for k in keys if k.rsplit(".", 1)[-1] == leaf]
    if len(by_leaf) == 1:
        return by_leaf[0]
    close = difflib.get_close_matches(leaf, [k.rsplit(".", 1)[-1] for k in keys], n=1, cutoff=0.75)
    matches = [k for k in keys if close and k.rsplit(".", 1)[-1] == close[0]]
    return matches[0] if len(matches) == 1 else None


def _unknown_key(key: str) -> UsageError:
    close = closest_key(key)
    hint = f"; did you mean {close}?" if close else "; see `python -m launcher.train --print_config` for all keys"
    return UsageError(f"unknown recipe key {key!r}{hint}")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML or CLI value to the field's type, or raise UsageError naming the key."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "yes", "on", "1"):
            return True
        if isinstance(value, str) and value.strip().lower() in ("false", "no", "off", "0"):
            return False
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise UsageError(f"{key}: expected true or false; got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise UsageError(f"{key}: expected an integer; got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                as_float = float(value.replace("_", ""))
            except ValueError:
                as_float = math.nan
            if math.isfinite(as_float) and as_float.is_integer():
                return int(as_float)
        raise UsageError(f"{key}: expected an integer; got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise UsageError(f"{key}: expected a number; got {value!r}")
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise UsageError(f"{key}: expected a number; got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, bool | int | float):
            return str(value)
        raise UsageError(f"{key}: expected a string; got {value!r}")
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v for v in value.replace(",", " ").split() if v]
        if not isinstance(value, list | tuple):
            if origin is tuple and args and args[-1] is not Ellipsis:
                raise UsageError(f"{key}: expected {len(args)} values separated by commas; got {value!r}")
            raise UsageError(f"{key}: expected a list; got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise UsageError(f"{key}: expected {len(args)} values; got {list(value)!r}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise UsageError(f"{key}: expected a mapping; got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    raise AssertionError(f"unsupported config type {tp!r} for {key}")


def _build(cls: type, raw: Any, prefix: str) -> Any:
    path = f"{prefix}." if prefix else ""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UsageError(f"{prefix or 'recipe'}: expected a mapping of keys; got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in names:
            raise _unknown_key(f"{path}{key}")
    kwargs = {k: _coerce(v, hints[k], f"{path}{k}") for k, v in raw.items()}
    try:
        return cls(**kwargs)
    except _FieldError as err:
        raise UsageError(f"{path}{err.key}: {err}") from None


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    if any(not p for p in parts):
        raise UsageError(f"malformed override key {key!r}; use --section.field=value, e.g. --optim.lr=0.005")
    node = tree
    for i, part in enumerate(parts[:-1]):
        sub = node.get(part)
        if sub is None:
            sub = node[part] = {}
        if not isinstance(sub, dict):
            raise _unknown_key(key) if ".".join(parts[: i + 1]) not in valid_keys() else UsageError(
                f"{'.'.join(parts[: i + 1])} is a value, not a section; cannot set {key}")
        node = sub
    node[parts[-1]] = value


def _check_known(key: str) -> None:
    if any(key == f or key.startswith(f + ".") for f in _FREE_FORM):
        return
    if key not in valid_keys():
        raise _unknown_key(key)


class _StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (YAML keeps the last silently)."""


def _strict_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue  # `<<: *anchor` may legitimately be overridden by explicit keys
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        try:
            first = seen.get(key)
        except TypeError:  # an unhashable key: let the constructor report it
            break
        if first is not None:
            raise _DuplicateKey(key, line, first)
        seen[key] = line
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _strict_mapping)


class _DuplicateKey(Exception):
    def __init__(self, key: Any, line: int, first: int):
        super().__init__(key)
        self.key, self.line, self.first = key, line, first


_KINDS = {yaml.SequenceNode: "a list", yaml.ScalarNode: "a single value"}


def read_recipe(path: str | Path) -> dict:
    """Read a recipe YAML into a plain dict.

    UsageError (naming the file and, where there is one, the line) if the file is missing or
    unreadable, is not valid YAML, is empty, has a top level that is not a mapping, or gives a key
    twice in one mapping.
    """
    p = Path(path)
    name = str(path)
    if p.is_dir():
        raise UsageError(f"recipe {name!r} is a directory; pass --recipe path/to/recipe.yaml (see recipes/)")
    if not p.is_file():
        near = [c for c in (f"{name}.yaml", f"{name}.yml", os.path.join("recipes", name),
                            os.path.join("recipes", f"{name}.yaml")) if os.path.isfile(c)]
        hint = f"did you mean --recipe {near[0]}?" if near else "pass --recipe path/to/recipe.yaml (see recipes/)"
        raise UsageError(f"recipe file not found: {name!r}; {hint}")
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else "not UTF-8 text"
        raise UsageError(f"recipe {name!r} cannot be read ({reason}); pass a readable recipe YAML") from None
    loader = _StrictLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            raise UsageError(f"recipe {name!r} is empty (line 1); a recipe needs at least a task: or optim: "
                             f"section (see recipes/mnist1d.yaml)")
        if not isinstance(node, yaml.MappingNode):
            raise UsageError(f"recipe {name!r} line {node.start_mark.line + 1}: the top level must be a mapping of "
                             f"sections (task:, optim:, ...); got {_KINDS.get(type(node), 'something else')}")
        raw = loader.construct_document(node)
    except _DuplicateKey as dup:
        raise UsageError(f"recipe {name!r} line {dup.line}: key {dup.key!r} is given twice in the same "
                         f"section (first at line {dup.first}); keep one of them") from None
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        raise UsageError(f"recipe {name!r} is not valid YAML{line}; fix the file") from None
    finally:
        loader.dispose()
    if not raw:
        raise UsageError(f"recipe {name!r} is empty (line 1); a recipe needs at least a task: or optim: "
                         f"section (see recipes/mnist1d.yaml)")
    return raw


def load_config(recipe: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Defaults <- recipe YAML <- dotted overrides, validated. Raises UsageError on any mistake."""
    tree = read_recipe(recipe) if recipe is not None else {}
    for key, value in (overrides or {}).items():
        key = key.lstrip("-").replace("-", "_") if key.startswith("-") else key
        _check_known(key)
        _set_dotted(tree, key, value)
    cfg = _build(Config, tree, "")
    if not cfg.name and recipe is not None:
        cfg = dataclasses.replace(cfg, name=Path(recipe).stem)
    return cfg


def to_dict(cfg: Any) -> dict:
    """The config as plain Python types (tuples become lists), re-loadable by `load_config`."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, list | tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(cfg)


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{'optim': {'lr': 1}} -> {'optim.lr': 1} (for trackers and comparisons)."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None)
