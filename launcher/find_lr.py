"""LR range test: find a good base learning rate instead of guessing it.

    python -m launcher.find_lr --recipe recipes/mnist1d.yaml [--start_lr 1e-7] [--end_lr 1] [--num_steps 300]
    accelerate launch --config_file accelerate_configs/cpu_ddp.yaml -m launcher.find_lr --recipe R ...

A fresh copy of the recipe's model trains for `num_steps` optimizer steps while the LR grows
exponentially from `start_lr` to `end_lr` (the same LR in every parameter group; the recipe's warmup,
decay and plateau are ignored, its optimizer, weight decay, gradient clipping, batch, accumulation and
precision are kept). The loss of every step is averaged over all ranks, so every rank sees the same
curve and takes the same decision to stop once the smoothed loss exceeds `diverge_factor` x its best.

The suggestion is the LR where the smoothed loss falls fastest: the most negative slope against
log LR (a least-squares line through each point and its neighbours, 5% of the steps on each side),
before the minimum, ignoring the first 10% and last 5% of the points. The LR of the minimum / 10 is
printed as a second opinion. Both are reported as the recipe's `optim.lr`, i.e. divided by the
plan's `lr_scale` when `optim.lr_scaling` is on, so `--apply` writes a value that trains the same.

Nothing touches the recipe or a real run: results go to a new `--output_dir` (lr_find.json,
lr_find.png, or `--plot PATH`) and `--apply out.yaml` writes a new file, keeping the recipe's
comments (a round-trip YAML edit). See docs/find_lr.md.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from typing import Any

from launcher.errors import UsageError, run_cli
from launcher.output import check_dir, check_plot, make_parents, makedirs
from launcher.recipe_edit import check_apply, write_recipe

RESULT_FILE = "lr_find.json"


# ---------------------------------------------------------------------------------------------
# The curve: pure functions (no torch), shared by the CLI and the tests.
# ---------------------------------------------------------------------------------------------


def lr_at(step: int, num_steps: int, start_lr: float, end_lr: float) -> float:
    """LR of optimizer step `step` (0-based): start_lr at step 0, end_lr at step num_steps - 1."""
    if num_steps <= 1:
        return start_lr
    return start_lr * (end_lr / start_lr) ** (step / (num_steps - 1))


class Smoother:
    """Exponential moving average with bias correction (the first values are not pulled toward 0)."""

    def __init__(self, beta: float):
        self.beta = beta
        self.avg = 0.0
        self.count = 0

    def update(self, value: float) -> float:
        self.count += 1
        self.avg = self.beta * self.avg + (1 - self.beta) * value
        return self.avg / (1 - self.beta ** self.count)


def edge_skips(num_steps: int) -> tuple[int, int, int]:
    """(points ignored at the start, points ignored at the end, half width of the slope window)."""
    return max(1, num_steps // 10), max(1, num_steps // 20), max(2, num_steps // 20)


@dataclass(frozen=True)
class Suggestion:
    index: int
    """Point of steepest descent of the smoothed loss."""
    lr: float
    min_index: int
    """Point of the smallest smoothed loss."""
    min_lr_div_10: float


def local_slopes(log_lrs, values, half_window: int):
    """Slope of a least-squares line through each point and its `half_window` neighbours on each side.

    A two-point difference of the smoothed loss is mostly noise: each EMA step moves by
    (1 - beta) x (loss - average), so its largest drop marks the noisiest batch, not the curve.
    """
    import numpy as np

    x = np.asarray(log_lrs, dtype=float)
    y = np.asarray(values, dtype=float)
    out = np.empty(len(x))
    for i in range(len(x)):
        lo, hi = max(0, i - half_window), min(len(x), i + half_window + 1)
        dx = x[lo:hi] - x[lo:hi].mean()
        out[i] = (dx * (y[lo:hi] - y[lo:hi].mean())).sum() / max((dx * dx).sum(), 1e-300)
    return out


def suggest(lrs: list[float], smoothed: list[float], skip_start: int, skip_end: int,
            half_window: int) -> Suggestion | None:
    """Steepest descent of `smoothed` against log(lr), searched in [skip_start, len - skip_end) and not
    beyond the minimum of the smoothed loss there; None if fewer than 3 points remain."""
    import numpy as np

    values = np.asarray(smoothed, dtype=float)
    finite = len(values) if np.all(np.isfinite(values)) else int(np.argmin(np.isfinite(values)))
    end = min(finite, len(values) - skip_end)
    if end - skip_start < 3:
        return None
    log_lrs = np.log(np.asarray(lrs[:finite], dtype=float))
    slopes = local_slopes(log_lrs, values[:finite], half_window)
    min_index = skip_start + int(np.argmin(values[skip_start:end]))
    last = max(min_index, skip_start + 2)
    index = skip_start + int(np.argmin(slopes[skip_start:last + 1]))
    return Suggestion(index=index, lr=float(lrs[index]), min_index=min_index,
                      min_lr_div_10=float(lrs[min_index]) / 10)


# ---------------------------------------------------------------------------------------------
# --apply: a copy of the recipe with new values, comments kept where the YAML allows it.
# ---------------------------------------------------------------------------------------------


def _check_output_dir(path: str) -> str | None:
    if os.path.exists(path) and not os.path.isdir(path):
        return f"--output_dir {path!r} exists and is not a directory; choose another --output_dir"
    if os.path.isdir(path) and any(os.scandir(path)):
        return f"output directory {path!r} already exists and is not empty; choose another --output_dir"
    return None


def _agree_output_dir(accelerator, name: str, output_dir: str | None) -> str:
    """The output directory, the same on all ranks (the default name holds a timestamp).

    Nothing is created here: the main process creates it only once there are results to write, so
    a test that fails to start leaves nothing behind.
    """
    from launcher.distributed import agree

    def decide():
        path = output_dir or os.path.join("runs", f"find_lr-{name}-{time.strftime('%Y%m%d-%H%M%S')}")
        return os.path.abspath(path), _check_output_dir(path)

    # Every rank must learn the verdict, or the others would train while the main process exits.
    return agree(accelerator, decide)


class RangeTest:
    """A trainer hook: the LR grows exponentially step by step; stop when the smoothed loss diverges.

    It replaces the recipe's schedule for the run (`LRSchedule` below) and reads the loss of every
    step, averaged over all ranks, at the flush after it (`train.log_every_n_steps` is 1 here), so
    every rank sees the same curve and takes the same decision to stop.
    """

    def __init__(self, start_lr: float, end_lr: float, num_steps: int, beta: float, diverge_factor: float, log=print):
        self.start_lr, self.end_lr, self.num_steps = start_lr, end_lr, num_steps
        self.diverge_factor = diverge_factor
        self.smoother = Smoother(beta)
        self.log = log
        self.lrs: list[float] = []
        self.losses: list[float] = []
        self.smoothed: list[float] = []
        self.best = math.inf
        self.stop_reason = "reached end_lr"

    def on_train_start(self, trainer) -> None:
        trainer.scheduler = LRSchedule(trainer.optimizer, self.start_lr, self.end_lr, self.num_steps)

    def on_flush(self, trainer, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            value = row["train/loss"]
            value = math.nan if value is None else value
            lr = row["lr"]
            self.lrs.append(lr)
            self.losses.append(value)
            smooth = self.smoother.update(value) if math.isfinite(value) else math.nan
            self.smoothed.append(smooth)
            if math.isfinite(smooth):
                self.best = min(self.best, smooth)
            if not math.isfinite(smooth):
                self.stop_reason = f"loss became non-finite at lr {lr:.3g}"
            elif smooth > self.diverge_factor * self.best:
                self.stop_reason = f"smoothed loss exceeded {self.diverge_factor:g} x its best at lr {lr:.3g}"
            n = len(self.lrs)
            if self.stop_reason != "reached end_lr" or n >= self.num_steps:
                trainer.stop()
                return
            if n % max(1, self.num_steps // 6) == 0:
                self.log(f"step {n}/{self.num_steps}  lr {lr:.3e}  loss {value:.4f}  smoothed {smooth:.4f}")


class LRSchedule:
    """The range test's LR for the trainer: every param group at lr_at(k - 1) for optimizer step k (1-based)."""

    plateau = None

    def __init__(self, optimizer, start_lr: float, end_lr: float, num_steps: int):
        self.optimizer, self.start_lr, self.end_lr, self.num_steps = optimizer, start_lr, end_lr, num_steps
        self.apply(1)

    def apply(self, k: int) -> list[float]:
        self.lrs = [lr_at(k - 1, self.num_steps, self.start_lr, self.end_lr)] * len(self.optimizer.param_groups)
        for group, lr in zip(self.optimizer.param_groups, self.lrs):
            group["lr"] = lr
        return self.lrs

    def get_last_lr(self) -> list[float]:
        return self.lrs

    def end_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}


RANGE_TEST_OVERRIDES = {
    "checkpoint.enabled": False, "schedule.plateau.enabled": False, "train.log_every_n_steps": 1,
    "train.eval_every_n_epochs": 1_000_000, "train.progress_bar": "off", "train.on_nonfinite": "skip",
    "tracking.wandb.enabled": False, "tracking.tensorboard": False,
}
"""What the range test changes in the recipe: no checkpoints, plateau or evaluation, a flush every step
(the hook decides on every step's rank-averaged loss), non-finite steps skipped (the hook stops on them)."""


def range_test(cfg, accelerator, start_lr: float, end_lr: float, num_steps: int, beta: float,
               diverge_factor: float, log=print) -> dict[str, Any]:
    """Train a fresh model of `cfg` with the trainer's own build and step, the LR growing exponentially.

    Returns the curve, identical on all ranks. The trainer's files go to a temporary directory that is
    removed afterwards: the range test keeps only its curve.
    """
    import shutil
    import tempfile

    from launcher.trainer import Trainer

    hook = RangeTest(start_lr, end_lr, num_steps, beta, diverge_factor, log)
    scratch = tempfile.mkdtemp(prefix="lr_find-") if accelerator.is_main_process else os.devnull
    try:
        trainer = Trainer(cfg, scratch, accelerator, hooks=[hook], quiet=True)
        try:
            trainer.train()
        finally:
            trainer.close()
    finally:
        if accelerator.is_main_process:
            shutil.rmtree(scratch, ignore_errors=True)
    return {"lrs": hook.lrs, "losses": hook.losses, "smoothed": hook.smoothed, "stop_reason": hook.stop_reason,
            "plan": trainer.plan, "task": trainer.task.description or cfg.task.name}


def plot_curve(result: dict[str, Any], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lrs = result["lrs"]
    fig, ax = plt.subplots(figsize=(7, 4))
    finite = [(lr, v) for lr, v in zip(lrs, result["losses"]) if math.isfinite(v)]
    if finite:
        ax.plot(*zip(*finite), color="0.75", linewidth=1, label="loss (per step)")
    ax.plot(lrs, result["smoothed"], color="C0", linewidth=2, label=f"smoothed (beta {result['beta']:g})")
    s = result.get("suggestion_index")
    if s is not None:
        lr_eff = result["lrs"][s]
        ax.axvline(lr_eff, color="C3", linestyle="--", linewidth=1)
        ax.plot([lr_eff], [result["smoothed"][s]], "o", color="C3",
                label=f"suggestion {result['suggestion']:.3g} (steepest descent)")
        m = result["min_index"]
        ax.axvline(lrs[m] / 10, color="C2", linestyle=":", linewidth=1,
                   label=f"minimum / 10 = {result['min_lr_div_10']:.3g}")
    ax.set_xscale("log")
    values = [v for v in result["smoothed"] if math.isfinite(v)]
    if values:  # keep the divergence spike from flattening the interesting part
        low, first = min(values), values[0]
        top = max(first, low) + 0.25 * (max(first, low) - low + 1e-12)
        ax.set_ylim(low - 0.25 * (top - low), top)
    xlabel = "learning rate (log scale)"
    if result["lr_scale"] != 1:
        xlabel += f"; optimizer LR = optim.lr x {result['lr_scale']:.4g} (lr_scaling)"
    ax.set_xlabel(xlabel)
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _validate(start_lr: Any, end_lr: Any, num_steps: Any, beta: Any, diverge_factor: Any) -> tuple:
    def number(name: str, value: Any) -> float:
        try:
            out = float(value)
        except (TypeError, ValueError):
            raise UsageError(f"--{name} must be a number; got {value!r}") from None
        if not math.isfinite(out):
            raise UsageError(f"--{name} must be a finite number; got {value!r}")
        return out

    start, end = number("start_lr", start_lr), number("end_lr", end_lr)
    if start <= 0:
        raise UsageError(f"--start_lr must be > 0; got {start_lr!r}")
    if end <= start:
        raise UsageError(f"--end_lr must be larger than --start_lr ({start:g}); got {end_lr!r}")
    steps = number("num_steps", num_steps)
    if not steps.is_integer() or steps < 10:
        raise UsageError(f"--num_steps must be a whole number >= 10 (300 is the default); got {num_steps!r}")
    b = number("beta", beta)
    if not 0 <= b < 1:
        raise UsageError(f"--beta must be in [0, 1) (0.98 is the usual smoothing); got {beta!r}")
    factor = number("diverge_factor", diverge_factor)
    if factor <= 1:
        raise UsageError(f"--diverge_factor must be > 1 (stop when the smoothed loss exceeds this x its best); "
                         f"got {diverge_factor!r}")
    return start, end, int(steps), b, factor


def main(recipe: str | None = None, start_lr: float = 1e-7, end_lr: float = 1.0, num_steps: int = 300,
         plot: str | None = None, output_dir: str | None = None, apply: str | None = None,
         beta: float = 0.98, diverge_factor: float = 4.0, **overrides: Any) -> None:
    """LR range test: sweep the LR exponentially over a short run and suggest a base optim.lr.

    Args:
      recipe: recipe YAML (see recipes/). Required. Neither the file nor any run is changed.
      start_lr: LR of the first optimizer step.
      end_lr: LR of the last step (the test stops earlier if the loss diverges).
      num_steps: optimizer steps of the sweep (after gradient accumulation; at least 10). Fewer
        steps make the suggestion noisier and higher (docs/find_lr.md).
      plot: where to write the loss-vs-LR plot (any path; its directory is created); default
        lr_find.png inside output_dir; '' or none to skip it.
      output_dir: where lr_find.json and the plot go; default runs/find_lr-<recipe>-<timestamp>.
        An existing non-empty directory is refused.
      apply: write a copy of the recipe (with any --a.b=v overrides) with optim.lr set to the
        suggestion to this new YAML file; an existing file is refused.
      beta: smoothing of the loss (exponential moving average with bias correction).
      diverge_factor: stop once the smoothed loss exceeds this x its best value.
      overrides: dotted recipe keys, e.g. --train.batch_size=32 --optim.weight_decay=0.01
    """
    from launcher.config import load_config

    if recipe is None:
        raise UsageError("--recipe is required, e.g. python -m launcher.find_lr --recipe recipes/mnist1d.yaml")
    if not isinstance(recipe, str):
        raise UsageError(f"--recipe needs a file name, e.g. --recipe recipes/mnist1d.yaml; got {recipe!r}")
    start_lr, end_lr, num_steps, beta, diverge_factor = _validate(start_lr, end_lr, num_steps, beta, diverge_factor)
    for flag, value in (("output_dir", output_dir), ("apply", apply)):
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise UsageError(f"--{flag} needs a path; got {value!r}")
    cfg = load_config(recipe, overrides)
    # The range test's own settings on top (the recipe's schedule is replaced by RangeTest's).
    cfg = load_config(recipe, {**overrides, **RANGE_TEST_OVERRIDES, "train.max_steps": num_steps,
                               "train.num_epochs": max(cfg.train.num_epochs, num_steps)})
    from launcher.train import check_data_root

    check_data_root(cfg)
    skip_plot = plot is False or (isinstance(plot, str) and plot.strip().lower() in ("", "none", "false"))
    if plot is not None and not skip_plot and not isinstance(plot, str):
        raise UsageError(f"--plot needs a file name, e.g. --plot lr_find.png (or none); got {plot!r}")
    plot_path = None if skip_plot or plot is None else str(plot)
    if plot_path is not None:
        check_plot(plot_path, "--plot")
    if output_dir is not None:
        check_dir(output_dir, "--output_dir")
    else:
        check_dir("runs", "--output_dir")
    for problem in (check_apply(str(apply)) if apply is not None else None,
                    _check_output_dir(str(output_dir)) if output_dir is not None else None):
        if problem:
            raise UsageError(problem)

    from launcher.distributed import make_accelerator, shutdown

    accelerator = make_accelerator(cfg.train, cfg.optim.clip_grad_norm)
    is_main = accelerator.is_main_process

    def log(message: str) -> None:
        if is_main:
            print(message, flush=True)

    try:
        run_dir = _agree_output_dir(accelerator, cfg.name or "recipe", output_dir)
        log(f"LR range test: {start_lr:.3g} -> {end_lr:.3g} over {num_steps} steps; output directory: {run_dir}")
        curve = range_test(cfg, accelerator, start_lr, end_lr, num_steps, beta, diverge_factor, log)
    finally:
        shutdown(accelerator)
    plan = curve.pop("plan")
    log(f"task: {curve.pop('task')}; global batch {plan.global_batch} "
        f"({plan.per_device_batch} x {plan.num_processes} processes x {plan.grad_accum_steps} accumulation); "
        f"{len(curve['lrs'])} steps, stopped: {curve['stop_reason']}")
    skip_start, skip_end, half_window = edge_skips(num_steps)
    found = suggest(curve["lrs"], curve["smoothed"], skip_start, skip_end, half_window)
    scale = plan.lr_scale
    result: dict[str, Any] = {
        "recipe": str(recipe), "overrides": {k: v for k, v in overrides.items()},
        "start_lr": start_lr, "end_lr": end_lr, "num_steps": num_steps, "beta": beta,
        "diverge_factor": diverge_factor, "num_processes": plan.num_processes, "global_batch": plan.global_batch,
        "lr_scaling": cfg.optim.lr_scaling, "lr_scale": scale, **curve,
        "suggestion": found.lr / scale if found else None,
        "suggestion_lr": found.lr if found else None,
        "suggestion_index": found.index if found else None,
        "min_lr_div_10": found.min_lr_div_10 / scale if found else None,
        "min_index": found.min_index if found else None,
    }
    if not is_main:
        return
    problem = _check_output_dir(run_dir)  # it may have appeared while the test ran
    if problem:
        raise UsageError(problem)
    makedirs(run_dir, "--output_dir")
    with open(os.path.join(run_dir, RESULT_FILE), "w") as f:
        json.dump(result, f, indent=2)
    if plot_path is None and not skip_plot:
        plot_path = os.path.join(run_dir, "lr_find.png")
    if plot_path is not None:
        plot_curve(result, make_parents(plot_path, "--plot"),
                   f"LR range test: {cfg.name or 'recipe'}, global batch {plan.global_batch}")
    if found is None:
        raise UsageError(
            f"no suggestion: the test stopped after {len(curve['lrs'])} of {num_steps} steps ({curve['stop_reason']}); "
            f"lower --start_lr or --end_lr, or raise --num_steps (curve saved in {run_dir})")
    scaled = f" (optimizer LR {found.lr:.3g} at global batch {plan.global_batch} after lr_scaling x {scale:.4g})" \
        if scale != 1 else ""
    print(f"suggested lr: {result['suggestion']:.3g}{scaled}", flush=True)
    print(f"minimum / 10: {result['min_lr_div_10']:.3g} (second opinion; smoothed loss is lowest at "
          f"{curve['lrs'][found.min_index] / scale:.3g})", flush=True)
    print(f"results: {os.path.join(run_dir, RESULT_FILE)}" + (f", plot: {plot_path}" if plot_path else ""),
          flush=True)
    if apply is not None:
        write_recipe(str(recipe), str(apply), overrides, float(f"{result['suggestion']:.3g}"))


def cli() -> None:
    run_cli(main, name="launcher.find_lr")


if __name__ == "__main__":
    cli()
