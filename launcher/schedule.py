"""The LR recipe: warmup (in optimizer steps) x per-epoch decay x plateau factor.

Conventions (all counts are optimizer updates, after gradient accumulation):

- `k` is the 1-based index of an optimizer step; `lr(k)` is the LR that step uses.
- Warmup, W steps: lr(k) = base * (s + (1 - s) * k / W) for k <= W, with s = warmup_start_factor.
  Step 1 already moves (base * (s + (1 - s) / W)); step W uses the full base LR.
- After warmup, g = k - 1 - W steps have been taken since warmup ended, e = g / steps_per_epoch:
    exponential  base * decay_rate ** e          (staircase: ** floor(e), changes at epoch boundaries)
    cosine       min_lr + (base - min_lr) * (1 + cos(pi * g / H)) / 2,   H = total_steps - W
    linear       min_lr + (base - min_lr) * (1 - g / H)
    constant     base
  then floored at `schedule.min_lr`.
- Plateau: a factor (1, 0.5, 0.25, ...) multiplied on top, changed only at epoch ends from a
  validation metric that every rank computed over the whole validation set. It follows
  torch.optim.lr_scheduler.ReduceLROnPlateau step for step (best, bad epochs, cooldown), except
  that epochs spent in warmup (ending at or before its last step) never count as bad.
  `plateau.style: keras` follows Keras' ReduceLROnPlateau instead (`Plateau._step_keras`).
- `granularity: epoch`: one LR per epoch, as Keras callbacks set it at epoch starts (`_epoch_lr`).

The trainer sets the LRs of the next optimizer step after every update (`LRScheduler.apply(k)`;
the trainer's step is the only step counter) and never passes the scheduler to
`accelerator.prepare` (which would step it once per process: accelerate#2318).

Preview the schedule: `python -m launcher.schedule --recipe recipes/mnist1d_fast.yaml`.
"""

from __future__ import annotations

import json
import math
from typing import Any

from launcher.config import ScheduleConfig
from launcher.errors import UsageError
from launcher.plateau import Plateau

# ---------------------------------------------------------------------------------------------
# The smooth part: a pure function of the optimizer step.
# ---------------------------------------------------------------------------------------------


def warmup_factor(k: int, warmup_steps: int, start_factor: float) -> float:
    if warmup_steps <= 0 or k >= warmup_steps:
        return 1.0
    return start_factor + (1.0 - start_factor) * k / warmup_steps


def scheduled_lr(k: int, base_lr: float, cfg: ScheduleConfig, warmup_steps: int, steps_per_epoch: int,
                 total_steps: int) -> float:
    """LR used by optimizer step k (1-based), before any plateau reduction."""
    if cfg.granularity == "epoch":
        return _epoch_lr(k, base_lr, cfg, warmup_steps, steps_per_epoch)
    if k <= warmup_steps:
        return base_lr * warmup_factor(k, warmup_steps, cfg.warmup_start_factor)
    done = k - 1 - warmup_steps
    if cfg.decay == "exponential":
        epochs = done / steps_per_epoch
        if cfg.staircase:
            epochs = math.floor(epochs)
        lr = base_lr * cfg.decay_rate ** epochs
    elif cfg.decay in ("cosine", "linear"):
        horizon = max(1, total_steps - warmup_steps)
        frac = min(1.0, done / horizon)
        shape = 0.5 * (1.0 + math.cos(math.pi * frac)) if cfg.decay == "cosine" else 1.0 - frac
        lr = cfg.min_lr + (base_lr - cfg.min_lr) * shape
    else:
        lr = base_lr
    return max(cfg.min_lr, lr)


def _epoch_lr(k: int, base_lr: float, cfg: ScheduleConfig, warmup_steps: int, steps_per_epoch: int) -> float:
    """Granularity `epoch`: one LR per epoch, as a Keras callback sets it at the epoch's start.

    Epoch e (1-based, the epoch step k belongs to) uses base x (s + (1 - s) x e / W) for e <= W warmup
    epochs, then base x decay_rate ** (e - W) (exponential) or base (constant), floored at min_lr.
    """
    epoch = (k - 1) // steps_per_epoch + 1
    warmup_epochs = round(warmup_steps / steps_per_epoch)
    if epoch <= warmup_epochs:
        s = cfg.warmup_start_factor
        return base_lr * (s + (1.0 - s) * epoch / warmup_epochs)
    lr = base_lr * cfg.decay_rate ** (epoch - warmup_epochs) if cfg.decay == "exponential" else base_lr
    return max(cfg.min_lr, lr)


def phase(k: int, cfg: ScheduleConfig, warmup_steps: int) -> str:
    if k <= warmup_steps:
        return "warmup"
    if cfg.granularity == "epoch":
        return cfg.decay + " per epoch"
    return cfg.decay + (" staircase" if cfg.decay == "exponential" and cfg.staircase else "")


# ---------------------------------------------------------------------------------------------
# The scheduler the trainer steps.
# ---------------------------------------------------------------------------------------------


class LRScheduler:
    """Sets `group['lr']` of every param group to base_lr_g x warmup x decay x plateau.

    It keeps no step count of its own: the trainer's step is the one counter. `apply(k)` sets the
    LRs optimizer step k will use (the trainer calls it after every optimizer update with the next
    step's k, skipped updates included) and `end_epoch()` feeds the plateau once per epoch.
    `optimizer=None` previews the schedule without one.
    """

    def __init__(self, optimizer: Any, cfg: ScheduleConfig, base_lrs: list[float], warmup_steps: int,
                 steps_per_epoch: int, total_steps: int):
        self.optimizer = optimizer
        self.cfg = cfg
        self.base_lrs = list(base_lrs)
        self.warmup_steps = warmup_steps
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = total_steps
        self.plateau = Plateau(cfg.plateau) if cfg.plateau.enabled else None
        # lrs_at(k) for k in [_first, _first + len(_table)): an epoch at a time, rebuilt when the
        # plateau factor changes (only at epoch ends), so a step only looks its LRs up.
        self._first = 0
        self._table: list[list[float]] = []
        self.next_step = 1
        """The k of the last `apply(k)`: the optimizer step the LRs in the optimizer are for."""
        self.lrs: list[float] = []
        """What the last `apply` set, one per param group."""
        self.apply(1)

    @property
    def plateau_factor(self) -> float:
        return self.plateau.factor if self.plateau else 1.0

    def lrs_at(self, k: int) -> list[float]:
        """LRs (one per param group) that optimizer step k uses, with the current plateau factor."""
        out: list[float] = []
        factor = self.plateau.factor if self.plateau else 1.0
        floor = self.cfg.min_lr if k > self.warmup_steps else None
        for i, base in enumerate(self.base_lrs):
            if i and base == self.base_lrs[i - 1]:  # param groups usually share the base LR
                out.append(out[-1])
                continue
            lr = scheduled_lr(k, base, self.cfg, self.warmup_steps, self.steps_per_epoch, self.total_steps) * factor
            out.append(lr if floor is None else max(floor, lr))
        return out

    def get_last_lr(self) -> list[float]:
        """LRs the next optimizer step will use (what is set in the optimizer now)."""
        return self.lrs

    def apply(self, k: int) -> list[float]:
        """Set the LRs of optimizer step k (1-based) in the optimizer; returns them."""
        i = k - self._first
        if not 0 <= i < len(self._table):
            self._first, i = k, 0
            self._table = [self.lrs_at(j) for j in range(k, k + max(1, min(self.steps_per_epoch, 100_000)))]
        self.lrs = lrs = self._table[i]
        self.next_step = k
        if self.optimizer is not None:  # param_groups is a new list after optimizer.load_state_dict
            for group, lr in zip(self.optimizer.param_groups, lrs):
                group["lr"] = lr
        return lrs

    def end_epoch(self, epoch: int, metrics: dict[str, float]) -> str | None:
        """Feed the plateau with this epoch's validation metrics; returns a message on a reduction."""
        if self.plateau is None:
            return None
        name = self.cfg.plateau.metric
        if name not in metrics:
            raise KeyError(f"schedule.plateau.metric: {name!r} is not a validation metric of this task "
                           f"(have: {', '.join(sorted(metrics))})")
        k = self.next_step
        scheduled = scheduled_lr(k, self.base_lrs[0], self.cfg, self.warmup_steps, self.steps_per_epoch,
                                 self.total_steps)
        in_warmup = self.warmup_steps > 0 and k - 1 <= self.warmup_steps
        message = self.plateau.step(float(metrics[name]), scheduled, epoch, counts=not in_warmup)
        self._table = []
        self.apply(k)
        return message

    def state_dict(self) -> dict[str, Any]:
        """The plateau state and the schedule's shape; the position is the trainer's step."""
        return {"base_lrs": self.base_lrs, "warmup_steps": self.warmup_steps,
                "steps_per_epoch": self.steps_per_epoch, "total_steps": self.total_steps,
                "plateau": self.plateau.state_dict() if self.plateau else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Checkpoints before the scheduler lost its counter also hold `num_steps` (equal to the step): ignored."""
        self.base_lrs = list(state["base_lrs"])
        self.warmup_steps = int(state["warmup_steps"])
        self.steps_per_epoch = int(state["steps_per_epoch"])
        self.total_steps = int(state["total_steps"])
        if self.plateau is not None and state.get("plateau"):
            self.plateau.load_state_dict(state["plateau"])
        self._table = []
        self.apply(self.next_step)


# ---------------------------------------------------------------------------------------------
# Preview: python -m launcher.schedule --recipe R
# ---------------------------------------------------------------------------------------------


def preview(cfg: ScheduleConfig, base_lr: float, warmup_steps: int, steps_per_epoch: int,
            total_steps: int) -> dict[str, Any]:
    """The LR of every optimizer step and at the end of every epoch, through the trainer's scheduler."""
    sched = LRScheduler(None, cfg, [base_lr], warmup_steps, steps_per_epoch, total_steps)
    steps = [sched.apply(k)[0] for k in range(1, total_steps + 1)]
    epochs = []
    for e in range(1, math.ceil(total_steps / steps_per_epoch) + 1):
        k = min(e * steps_per_epoch, total_steps)
        epochs.append({"epoch": e, "lr": steps[k - 1], "phase": phase(k, cfg, warmup_steps)})
    return {"steps": steps, "epochs": epochs}


def _plot(steps: list[float], steps_per_epoch: int, title: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot([(i + 1) / steps_per_epoch for i in range(len(steps))], steps)
    ax.set_xlabel("epoch")
    ax.set_ylabel("learning rate")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def whole_number(flag: str, value: Any, minimum: int) -> int:
    """A command-line count: an integer (or a whole float such as 1e3) >= minimum, else UsageError."""
    number: float | None = None
    if not isinstance(value, bool):
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = None
    if number is None or not math.isfinite(number) or not number.is_integer() or number < minimum:
        raise UsageError(f"--{flag} must be a whole number >= {minimum}; got {value!r}")
    return int(number)


FORMATS = ("table", "json")


def main(recipe: str | None = None, steps_per_epoch: int | None = None, num_epochs: int | None = None,
         num_processes: int = 1, plot: str | None = None, format: str = "table", json: bool = False,
         **overrides: Any) -> None:
    """Preview the exact LR of every optimizer step of a recipe (same code as the trainer).

    Args:
      recipe: recipe YAML. Required.
      steps_per_epoch: optimizer steps per epoch; default derived from the recipe's data and batch.
      num_epochs: override train.num_epochs for the preview.
      num_processes: processes the run will use (changes the global batch, LR scaling, steps per epoch).
      plot: write a PNG of LR against epoch to this path (its directory is created).
      format: `table` (the plan and one line per epoch) or `json` ({"steps": [...], "epochs": [...]}).
      json: the same as --format json.
      overrides: dotted recipe overrides, e.g. --optim.lr=0.005.
    """
    import dataclasses

    from launcher.config import load_config
    from launcher.output import check_plot, make_parents
    from launcher.plan import make_plan

    if recipe is None or not isinstance(recipe, str):
        raise UsageError("--recipe is required, e.g. python -m launcher.schedule --recipe recipes/mnist1d.yaml")
    if json is True:
        format = "json"
    elif json is not False:
        raise UsageError(f"--json takes no value (or use --format json); got {json!r}")
    if format not in FORMATS:
        raise UsageError(f"--format must be one of {', '.join(FORMATS)}; got {format!r}")
    num_processes = whole_number("num_processes", num_processes, 1)
    if steps_per_epoch is not None:
        steps_per_epoch = whole_number("steps_per_epoch", steps_per_epoch, 1)
    if num_epochs is not None:
        overrides["train.num_epochs"] = whole_number("num_epochs", num_epochs, 1)
    if plot is not None:
        if not isinstance(plot, str):
            raise UsageError(f"--plot needs a file name, e.g. --plot lr.png; got {plot!r}")
        check_plot(plot, "--plot")
    cfg = load_config(recipe, overrides)
    if steps_per_epoch is not None:
        global_batch = cfg.train.batch_size * num_processes * cfg.train.grad_accum_steps
        num_samples = steps_per_epoch * global_batch
    else:
        from launcher.tasks import build_task
        from launcher.train import check_data_root

        check_data_root(cfg)
        num_samples = len(build_task(cfg.task, cfg.data).train_set)
    plan = make_plan(cfg, num_processes, num_samples)
    result = preview(cfg.schedule, plan.base_lr, plan.warmup_steps, plan.steps_per_epoch, plan.total_steps)
    if plot:
        _plot(result["steps"], plan.steps_per_epoch, f"{cfg.name or 'recipe'}: LR schedule",
              make_parents(plot, "--plot"))
    if format == "json":
        print(_json_dumps({"steps": result["steps"],
                           "epochs": [{"epoch": e["epoch"], "lr": e["lr"]} for e in result["epochs"]]}))
        return
    for line in plan.describe()[1:]:
        print(line)
    for row in result["epochs"]:
        print(f"Epoch {row['epoch']}: {row['lr']:.4g} ({row['phase']})")
    if cfg.schedule.plateau.enabled:
        p = dataclasses.asdict(cfg.schedule.plateau)
        print(f"note: plateau reduction ({p['style']} style, metric {p['metric']}, factor {p['factor']}, "
              f"patience {p['patience']}, cooldown {p['cooldown']}) depends on validation metrics and is not "
              f"in this preview")
    if plot:
        print(f"plot: {plot}")


def _json_dumps(obj: Any) -> str:
    return json.dumps(obj)


def cli() -> None:
    from launcher.errors import run_cli

    run_cli(main, name="launcher.schedule")


if __name__ == "__main__":
    cli()
