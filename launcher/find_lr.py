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
from typing import Any

from launcher.errors import UsageError, run_cli
from launcher.lr_curve import Smoother, edge_skips, lr_at, plot_curve, suggest
from launcher.output import check_dir, check_plot, make_parents, makedirs
from launcher.recipe_edit import check_apply, write_recipe

RESULT_FILE = "lr_find.json"


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
