"""The recipe: one frozen tree of pydantic dataclasses, loaded from YAML plus dotted CLI overrides.

Precedence is CLI > YAML > defaults. Every key is checked: unknown keys (with the closest valid key
suggested), values of the wrong type and impossible values raise `UsageError` naming the dotted key,
which the entry points turn into one line and exit status 2 (`launcher.config_cli` holds the
coercion rules and the one error formatter). Each field's docstring is its description; each field
says whether it changes what a run learns (`affects_training`, `training_keys`). Nothing here
touches torch, so `--help` and config errors stay fast.

Derived values (world size, global batch, scaled LR, steps per epoch, warmup steps) never go back
into the config: they live in `launcher.plan.Plan`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import field_validator, model_validator

from launcher import config_cli
from launcher.config_cli import Section, flatten, problem, read_recipe, section, setting, to_dict
from launcher.errors import UsageError

__all__ = ["CheckpointConfig", "Config", "DataConfig", "OptimConfig", "PlateauConfig", "ScheduleConfig", "TaskConfig",
           "TrackingConfig", "TrainConfig", "WandbConfig", "affects_training", "closest_key", "flatten", "load_config",
           "read_recipe", "to_dict", "to_yaml", "training_keys", "valid_keys"]

# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------


@section
class TaskConfig(Section):
    name: str = "mnist1d"
    """A built-in task (`mnist1d`, `cifar10`, `gpt`) or `package.module:function` for your own."""
    model: str = ""
    """Model variant understood by the task (e.g. mnist1d: `cnn`, `mlp`, `linear`); empty = task default."""
    options: dict[str, Any] = setting(factory=dict)
    """Task-specific settings, validated by the task itself (e.g. gpt: `n_layer`, `block_size`)."""

    @field_validator("name")
    @classmethod
    def _named(cls, value: str) -> str:
        if not value.strip():
            raise problem("must name a task, e.g. mnist1d or my_pkg.my_module:build")
        return value


@section
class DataConfig(Section):
    root: str = setting("", training=False)
    """Where datasets are cached or already present; empty = $LAUNCHER_DATA or ~/.cache/launcher."""
    num_workers: int = setting(0, training=False, ge=0)
    """DataLoader worker processes (0 = load in the training process; best for small in-memory data)."""
    pin_memory: bool = setting(True, training=False)
    """Pin host memory for faster host-to-GPU copies (ignored without a GPU)."""
    val_batch_size: int = setting(0, training=False, ge=0)
    """Per-device batch size for evaluation; 0 = 4 x train.batch_size."""


@section
class OptimConfig(Section):
    name: Literal["adamw", "adam", "sgd"] = "adamw"
    """`adamw` (decoupled weight decay), `adam` (L2 penalty added to the gradient, torch.optim.Adam) or `sgd`."""
    lr: float = setting(1e-3, gt=0, allow_inf_nan=False, message="must be a positive number")
    """Base learning rate at `reference_batch_size` (before warmup, decay and plateau factors)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam's coefficients for the running averages of the gradient and its square."""
    eps: float = setting(1e-8, gt=0)
    """Added to the denominator of Adam's update."""
    momentum: float = setting(0.9, ge=0, lt=1)
    """Only for `sgd`."""
    weight_decay: float = setting(0.0, ge=0)
    """Weight decay coefficient (decoupled for `adamw`, an L2 penalty for `adam` and `sgd`)."""
    decay_norm_and_bias: bool = False
    """Apply weight decay to biases and normalisation weights too (off: they are excluded)."""
    clip_grad_norm: float = setting(0.0, ge=0, note="0 = off")
    """Clip gradients to this global L2 norm; 0 = no clipping (the norm is still measured and logged)."""
    lr_scaling: Literal["none", "linear", "sqrt"] = "none"
    """Scale `lr` with the global batch: `none`, `linear` (Goyal et al. 2017) or `sqrt`."""
    reference_batch_size: int = setting(0, ge=0)
    """The global batch `lr` was tuned for; required when lr_scaling is not `none`."""
    fused: bool = setting(True, training=False)
    """Use the fused AdamW/Adam/SGD kernel (CPU, CUDA): it also skips a non-finite update on the device,
    without a host sync (launcher.nonfinite). false: the foreach kernel and one host read per step."""

    @field_validator("betas")
    @classmethod
    def _betas(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in value):
            raise problem(f"must be two numbers in [0, 1); got {list(value)}")
        return value

    @model_validator(mode="after")
    def _scaling(self) -> OptimConfig:
        if self.lr_scaling != "none" and self.reference_batch_size <= 0:
            raise problem(f"must be set (> 0) when optim.lr_scaling={self.lr_scaling}: the global batch optim.lr "
                          f"was tuned for", ".reference_batch_size")
        return self


@section
class PlateauConfig(Section):
    enabled: bool = False
    """Reduce the LR when `metric` stops improving."""
    metric: str = setting("val/loss", min_length=1, message="must name a validation metric, e.g. val/loss")
    """A validation metric (averaged over the whole validation set on all ranks)."""
    style: Literal["torch", "keras"] = "torch"
    """`torch`: torch's ReduceLROnPlateau (reduce after `patience + 1` bad epochs, relative `threshold`);
    `keras`: Keras' ReduceLROnPlateau (reduce after `patience` bad epochs, absolute `min_delta`, cooldown
    as Keras counts it). See docs/schedule.md."""
    mode: Literal["min", "max"] = "min"
    """`min` if lower is better (loss), `max` if higher is better (accuracy)."""
    factor: float = setting(0.5, gt=0, lt=1)
    """Multiply the LR by this on a plateau."""
    patience: int = setting(3, ge=0)
    """Epochs without improvement tolerated; the LR drops after `patience + 1` bad epochs (torch style) or
    after `patience` bad epochs (keras style)."""
    cooldown: int = setting(2, ge=0)
    """Epochs after a reduction during which bad epochs are not counted (keras style: the epoch that
    ends the cooldown counts again, so Keras' cooldown=2 ignores one epoch)."""
    threshold: float = setting(1e-4, ge=0)
    """torch style: minimum change that counts as an improvement."""
    threshold_mode: Literal["rel", "abs"] = "rel"
    """torch style: `rel` (relative to the best value) or `abs` (absolute)."""
    min_delta: float = setting(0.0, ge=0, allow_inf_nan=False)
    """keras style: minimum absolute change that counts as an improvement (Keras' `min_delta`)."""
    min_lr: float = setting(0.0, ge=0)
    """Plateau reductions never take the LR below this."""

    @model_validator(mode="after")
    def _style(self) -> PlateauConfig:
        if self.style != "keras" and self.min_delta != 0:
            raise problem("is Keras' absolute threshold and needs schedule.plateau.style=keras; with the torch "
                          "style use schedule.plateau.threshold (and threshold_mode=abs)", ".min_delta")
        if self.style != "torch" and (self.threshold != 1e-4 or self.threshold_mode != "rel"):
            raise problem("threshold and threshold_mode are torch's; with schedule.plateau.style=keras set "
                          "schedule.plateau.min_delta (absolute) instead", ".threshold")
        return self


@section
class ScheduleConfig(Section):
    warmup_steps: int = setting(0, ge=0)
    """Linear warmup length in optimizer steps (after gradient accumulation)."""
    warmup_epochs: float = setting(0.0, ge=0)
    """Alternative to warmup_steps: converted with the real steps per epoch (set one, not both)."""
    warmup_start_factor: float = setting(0.0, ge=0, le=1)
    """Warmup ramps from base_lr x this (reached before step 1) to base_lr at the last warmup step."""
    granularity: Literal["step", "epoch"] = "step"
    """`step`: the LR changes every optimizer step. `epoch`: it changes only at epoch starts, as Keras
    callbacks set it: epoch e (1-based) uses base x e / warmup_epochs during warmup, then
    base x decay_rate ** (e - warmup_epochs) (needs whole warmup_epochs; decay constant or exponential)."""
    decay: Literal["constant", "exponential", "cosine", "linear"] = "constant"
    """After warmup: `constant`, `exponential` (decay_rate per epoch), `cosine` or `linear` (to min_lr at the end)."""
    decay_rate: float = setting(1.0, gt=0, le=1)
    """For `exponential`: the LR is multiplied by this once per epoch."""
    staircase: bool = False
    """For `exponential`: change the LR only at epoch boundaries instead of smoothly every step."""
    min_lr: float = setting(0.0, ge=0)
    """Floor for the decayed LR (warmup may start below it)."""
    plateau: PlateauConfig = setting(factory=PlateauConfig)
    """Reduce-on-plateau on top of the schedule."""

    @model_validator(mode="after")
    def _warmup(self) -> ScheduleConfig:
        if self.warmup_steps and self.warmup_epochs:
            raise problem("set schedule.warmup_steps or schedule.warmup_epochs, not both", ".warmup_epochs")
        if self.granularity == "epoch":
            if self.decay not in ("constant", "exponential"):
                raise problem(f"epoch granularity supports decay constant or exponential; got decay {self.decay}",
                              ".granularity")
            if self.warmup_steps:
                raise problem("epoch granularity counts warmup in epochs: set schedule.warmup_epochs, not "
                              "warmup_steps", ".granularity")
            if not float(self.warmup_epochs).is_integer():
                raise problem(f"must be a whole number of epochs with granularity epoch; got {self.warmup_epochs}",
                              ".warmup_epochs")
        return self


@section
class TrainConfig(Section):
    num_epochs: int = setting(10, ge=1)
    """Epochs to train (the schedule's length)."""
    max_steps: int = setting(0, ge=0, note="0 = no cap")
    """Stop after this many optimizer steps (0 = run all num_epochs)."""
    batch_size: int = setting(32, ge=1)
    """Per-device micro-batch size. Global batch = batch_size x processes x grad_accum_steps."""
    grad_accum_steps: int = setting(1, ge=1)
    """Micro-batches per optimizer step."""
    seed: int = setting(0, ge=0)
    """Seeds the model's initialisation and the data order."""
    init_from: str = ""
    """Start from these model weights instead of the seeded initialisation: a weights file
    (.safetensors, .pt), a checkpoint folder or a run directory (its newest intact checkpoint), from
    any engine. Only the weights: optimizer, schedule and data order start fresh. Ignored on --resume."""
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    """`no`, `bf16`, `fp16`, or `auto` (what the accelerate config / launcher says, else `no`)."""
    eval_every_n_epochs: int = setting(1, ge=1)
    """Evaluate (and feed the plateau schedule) every N epochs."""
    compile: bool = setting(False, training=False)
    """torch.compile the model."""
    channels_last: bool = setting(False, training=False)
    """Use channels_last memory format (convnets on GPU)."""
    deterministic: bool = setting(False, training=False)
    """torch.use_deterministic_algorithms(True) (slower; bitwise-reproducible kernels)."""
    on_nonfinite: Literal["skip", "stop"] = setting("stop", training=False)
    """What to do when the loss or gradients are NaN/inf on any rank: `skip` the step or `stop`."""
    max_nonfinite_skips: int = setting(10, training=False, ge=1)
    """With on_nonfinite=skip: stop after this many consecutive skipped steps."""
    progress_bar: Literal["auto", "on", "off"] = setting("auto", training=False)
    """`auto` (a bar when stderr is a terminal, else a line per epoch), `on` or `off`."""
    peak_tflops: float = setting(0.0, training=False, ge=0, note="0 = auto")
    """Peak dense TFLOP/s of one device for MFU (model FLOPs utilisation); 0 = known GPUs' bf16 peak, else no MFU."""
    log_every_n_steps: int = setting(25, training=False, ge=1)
    """Read the step rows back (one host sync, one all-reduce) every N optimizer steps. Non-finite
    stops and a preemption signal under several processes are acted on at these reads (and before
    each checkpoint), so within N steps; metrics.jsonl still gets one row per step."""
    hooks: list[str] = setting(factory=list, training=False)
    """Extra hooks, `package.module:name` each (launcher.hooks); $LAUNCHER_HOOKS adds more."""


@section
class CheckpointConfig(Section):
    enabled: bool = True
    """Save checkpoints (at the end of each epoch, and on preemption)."""
    every_n_steps: int = setting(0, ge=0, note="0 = end of epoch only")
    """Also checkpoint every N optimizer steps (0 = only at the end of each epoch)."""
    keep_last: int = setting(2, ge=1)
    """How many of the most recent checkpoints to keep (the best is kept in addition)."""
    keep_best: bool = True
    """Keep the checkpoint with the best `best_metric` too."""
    best_metric: str = "val/loss"
    """The validation metric that picks the best checkpoint."""
    best_mode: Literal["min", "max"] = "min"
    """`min` if lower `best_metric` is better, `max` if higher is."""
    signal: str = "SIGUSR1"
    """Preemption signal (besides SIGTERM): finish the step, checkpoint, exit with status 124."""

    @field_validator("signal")
    @classmethod
    def _signal(cls, value: str) -> str:
        if not (value.startswith("SIG") and value.isupper()):
            raise problem(f"must be a signal name such as SIGUSR1; got {value!r}")
        return value


@section
class WandbConfig(Section):
    enabled: bool = False
    """Log to Weights & Biases."""
    project: str = "launcher"
    """W&B project."""
    entity: str = ""
    """W&B user or team; empty = the API key's default entity."""
    group: str = ""
    """W&B group (e.g. the seeds of one setup)."""
    tags: list[str] = setting(factory=list)
    """W&B tags (`a,b` on the command line)."""
    job_type: str = "train"
    """W&B job type."""
    name: str = ""
    """W&B run name; empty = the run directory's name."""
    mode: Literal["", "online", "offline", "disabled"] = setting(
        "", message="must be online, offline, disabled or empty (auto)")
    """`online`, `offline` or `disabled`; empty = $WANDB_MODE, else online with a key, offline without."""
    dir: str = ""
    """Where W&B writes its files; empty = the run directory."""


@section
class TrackingConfig(Section):
    wandb: WandbConfig = setting(factory=WandbConfig)
    """Weights & Biases."""
    tensorboard: bool = False
    """Also write TensorBoard event files."""
    targets: list[float] = setting(factory=lambda: [0.5, 0.8, 0.9, 0.95])
    """summary.json records the epoch, step and seconds at which target_metric first reaches each."""
    target_metric: str = "val/accuracy"
    """The validation metric `targets` refer to."""

    @field_validator("targets")
    @classmethod
    def _targets(cls, value: list[float]) -> list[float]:
        if not all(t > 0 for t in value):
            raise problem(f"must be positive numbers; got {value}")
        return value


@section
class Config(Section):
    name: str = setting("", training=False)
    """Run name, used for the default output directory; empty = the recipe file's name."""
    task: TaskConfig = setting(factory=TaskConfig)
    """What is trained: the task (data, model, loss, metrics) and its options."""
    data: DataConfig = setting(factory=DataConfig, training=False)
    """Where data lives and how it is loaded."""
    optim: OptimConfig = setting(factory=OptimConfig)
    """The optimizer."""
    schedule: ScheduleConfig = setting(factory=ScheduleConfig)
    """The LR schedule (docs/schedule.md)."""
    train: TrainConfig = setting(factory=TrainConfig)
    """The training loop."""
    checkpoint: CheckpointConfig = setting(factory=CheckpointConfig, training=False)
    """Checkpoints and resuming (docs/checkpoints.md)."""
    tracking: TrackingConfig = setting(factory=TrackingConfig, training=False)
    """Metrics: W&B, TensorBoard, target metrics."""


# ---------------------------------------------------------------------------------------------
# Keys
# ---------------------------------------------------------------------------------------------

_FREE_FORM = {"task.options"}  # dict fields whose keys belong to someone else (the task)


def valid_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every dotted key of the tree (leaves and sections), e.g. `optim.lr`, `schedule.plateau`."""
    keys = []
    for name, info in cls.__pydantic_fields__.items():
        keys.append(f"{prefix}{name}")
        if config_cli.is_section(info.annotation):
            keys.extend(valid_keys(info.annotation, f"{prefix}{name}."))
    return keys


def closest_key(key: str) -> str | None:
    """The valid dotted key most like `key` (a typo, or a leaf name given without its section)."""
    return config_cli.closest_key(key, valid_keys())


def affects_training(key: str) -> bool:
    """Whether the dotted recipe key can change what a run learns (its seed included).

    The single source for grouping runs that are seeds of one setup (launcher.compare) and for the
    values a resumed run must share with its checkpoint (`training_keys`). A key inside a free-form
    section (`task.options.n_layer`) answers as its section. KeyError for a key not in the tree.
    """
    parts = key.split(".")
    cls: Any = Config
    for i, part in enumerate(parts):
        info = getattr(cls, "__pydantic_fields__", {}).get(part)
        if info is None:
            if ".".join(parts[:i]) in _FREE_FORM:
                return True
            raise KeyError(key)
        if not (info.json_schema_extra or {}).get("affects_training", True):
            return False
        cls = info.annotation
    return True


def training_keys(cfg: Config) -> dict[str, Any]:
    """The flattened recipe values that change what a run learns, JSON-safe (tuples become lists)."""
    flat = flatten(to_dict(cfg))
    keep = {k: v for k, v in flat.items() if affects_training(k)}
    return json.loads(json.dumps(keep))


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def _check_known(key: str) -> None:
    if any(key == f or key.startswith(f + ".") for f in _FREE_FORM):
        return
    if key not in valid_keys():
        raise config_cli.unknown_key(key, valid_keys())


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML or CLI value to the type `tp`, or raise UsageError naming `key`."""
    return config_cli.coerce(value, tp, key)


def build(tree: Any) -> Config:
    """Validate a plain tree (a recipe after overrides) into a Config; UsageError on any mistake."""
    if not isinstance(tree, dict):
        raise UsageError(f"recipe: expected a mapping of keys; got {tree!r}")
    for key in tree:
        if not isinstance(key, str):
            raise config_cli.unknown_key(str(key), valid_keys())
    return config_cli.validate(lambda: Config(**tree), Config, valid_keys())


def load_config(recipe: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Defaults <- recipe YAML <- dotted overrides, validated. Raises UsageError on any mistake."""
    tree = read_recipe(recipe) if recipe is not None else {}
    for key, value in (overrides or {}).items():
        key = key.lstrip("-").replace("-", "_") if key.startswith("-") else key
        _check_known(key)
        config_cli.set_dotted(tree, key, value, valid_keys())
    cfg = build(tree)
    if not cfg.name and recipe is not None:
        cfg = dataclasses.replace(cfg, name=Path(recipe).stem)
    return cfg


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None)
