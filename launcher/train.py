"""Train a recipe: `python -m launcher.train --recipe recipes/mnist1d.yaml [--a.b=v ...]`.

Runs unchanged under `accelerate launch [--config_file accelerate_configs/X.yaml] -m launcher.train`,
`torchrun -m launcher.train` or plain `python -m launcher.train` (one process).
"""

from __future__ import annotations

import os
import shutil
import time
from typing import Any

from launcher.config import Config, TrackingConfig, load_config, to_yaml
from launcher.errors import UsageError, run_cli
from launcher.output import check_dir, makedirs, warn


def main(recipe: str | None = None, output_dir: str | None = None, resume: str | None = None,
         print_config: bool = False, new_global_batch: bool = False, **overrides: Any) -> None:
    """Train a recipe on whatever Accelerate was configured for (CPU, GPUs, nodes).

    Args:
      recipe: recipe YAML (see recipes/). Required.
      output_dir: run directory; default runs/<recipe>-<timestamp>. An existing one is never overwritten.
      resume: `auto` (latest complete checkpoint in output_dir, or a fresh start) or a checkpoint path
        (RUN/checkpoints/step_N continues RUN unless --output_dir says otherwise).
        Exit status 124: preempted (SIGTERM / checkpoint.signal), checkpoint saved, resume with
        --resume auto; 3: stopped on a non-finite loss; 2: a usage error (nothing written).
      print_config: print the resolved recipe (defaults <- YAML <- overrides) and exit.
      new_global_batch: with --resume, continue a checkpoint whose global batch (per-device batch x
        processes x accumulation) differs from this run's, with this run's (else that is refused).
      overrides: dotted recipe keys, e.g. --optim.lr=0.005 --train.num_epochs=30 --schedule.plateau.patience=5
    """
    if recipe is None and not print_config:
        raise UsageError("--recipe is required, e.g. python -m launcher.train --recipe recipes/mnist1d.yaml")
    if recipe is not None and not isinstance(recipe, str):
        raise UsageError(f"--recipe needs a file name, e.g. --recipe recipes/mnist1d.yaml; got {recipe!r}")
    cfg = load_config(recipe, overrides)
    if print_config:
        print(to_yaml(cfg), end="")
        return
    if resume is not None and not isinstance(resume, str):
        raise UsageError(f"--resume needs a value: auto or a checkpoint directory; got {resume!r}")
    if output_dir is not None and (not isinstance(output_dir, str) or not output_dir.strip()):
        raise UsageError(f"--output_dir needs a directory name, e.g. --output_dir runs/my-run; got {output_dir!r}")
    new_global_batch = new_global_batch is True or str(new_global_batch).lower() in ("true", "1", "yes")
    if new_global_batch and resume is None:
        raise UsageError("--new_global_batch continues a checkpoint with another global batch; pass --resume too")
    if resume is not None and resume != "auto" and not os.path.exists(str(resume)):
        raise UsageError(f"--resume: checkpoint {resume!r} not found; pass --resume auto or a checkpoint directory")
    if resume not in (None, "auto") and output_dir is None:
        # --resume RUN/checkpoints/step_N continues that run's directory (metrics, summary, checkpoints).
        parent = os.path.dirname(os.path.abspath(str(resume)))
        if os.path.basename(parent) == "checkpoints":
            output_dir = os.path.dirname(parent)
    check_dir(output_dir or "runs", "--output_dir")
    if cfg.train.init_from:
        from launcher.weights import check_source

        check_source(cfg.train.init_from)
    task = check_task(cfg)

    from launcher.distributed import make_accelerator, shutdown

    accelerator = make_accelerator(cfg.train, cfg.optim.clip_grad_norm)
    run_dir, created = None, None
    try:
        run_dir, created = _claim_run_dir(accelerator, cfg.name or "run", output_dir, resume)
        from launcher.trainer import Trainer

        trainer = Trainer(cfg, run_dir, accelerator, resume=resume, new_global_batch=new_global_batch, task=task)
    except BaseException:
        if created and accelerator.is_main_process:
            shutil.rmtree(created, ignore_errors=True)  # a run that never started leaves nothing behind
        shutdown(accelerator)
        raise
    try:
        summary = trainer.train()
    finally:
        trainer.close()
    if accelerator.is_main_process:
        _print_result(summary, run_dir)
    from launcher.preemption import exit_status

    status = exit_status(summary.get("status", ""))
    if status:  # 124: preempted, checkpoint saved (resume with --resume auto); 3: stopped on NaN/inf
        raise SystemExit(status)


def _claim_run_dir(accelerator, name: str, output_dir: str | None, resume: str | None) -> tuple[str, str | None]:
    """Agree on the run directory across ranks and create it on the main process only.

    A fresh run refuses an existing non-empty directory (nothing is overwritten). With --resume the
    directory may exist; config.yaml is written only if absent. Returns (path, the topmost directory created here or None).
    """
    from launcher.output import agree

    def decide():
        path = output_dir or os.path.join("runs", f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")
        busy = os.path.isdir(path) and any(os.scandir(path))
        problem = None
        if os.path.exists(path) and not os.path.isdir(path):
            problem = f"--output_dir {path!r} exists and is not a directory; choose another --output_dir"
        elif busy and resume is None:
            problem = (f"output directory {path!r} already exists; choose another --output_dir, "
                       f"or pass --resume auto to continue that run")
        return (os.path.abspath(path), _first_missing(os.path.abspath(path))), problem

    # Every rank must learn the verdict before the main process creates anything.
    path, created = agree(accelerator, decide)
    if accelerator.is_main_process:
        makedirs(path, "--output_dir")
    return path, created


def check_data_root(cfg: Config) -> None:
    """data.root must be a directory, or creatable (a file there ends in a traceback inside the task)."""
    if cfg.data.root:
        check_dir(cfg.data.root, "--data.root")


def validation_metric_names(task) -> set[str]:
    """The `val/...` names evaluation will report for `task`: its metrics on two validation samples."""
    import torch
    from torch.utils.data import DataLoader

    loader = DataLoader(task.val_set, batch_size=min(2, len(task.val_set)), collate_fn=task.collate_fn)
    model = task.model
    was_training = model.training
    model.eval()
    # The loader draws a seed from torch's RNG: the trainer goes on with the task, and its RNG, as built.
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        inputs, targets = task.split(next(iter(loader)))
        values = task.metrics(model(inputs), targets)
    model.train(was_training)
    names = set(values)
    if task.finalize is not None:
        names |= set(task.finalize(dict.fromkeys(values, 1.0)))
    return {f"val/{name}" for name in names}


def check_task(cfg: Config):
    """Checks that need the task, done before any run directory exists: data.root, the plateau metric
    and the target metric must name what this task's evaluation reports. Returns the task if it had
    to be built for that (`seeded_task`, for the trainer to use), else None."""
    check_data_root(cfg)
    plateau = cfg.schedule.plateau
    default_target = cfg.tracking.target_metric == TrackingConfig.target_metric
    if not plateau.enabled and (default_target or not cfg.tracking.targets):
        return None
    from launcher.trainer import seeded_task

    task = seeded_task(cfg)
    names = validation_metric_names(task)
    have = ", ".join(sorted(names))
    if plateau.enabled and plateau.metric not in names:
        raise UsageError(f"schedule.plateau.metric: {plateau.metric!r} is not a validation metric of task "
                         f"{cfg.task.name!r}; use one of {have}")
    target = cfg.tracking.target_metric
    if cfg.tracking.targets and target not in names:
        if not default_target:
            raise UsageError(f"tracking.target_metric: {target!r} is not a validation metric of task "
                             f"{cfg.task.name!r}; use one of {have}")
        warn(f"tracking.target_metric {target!r} is not a validation metric of task {cfg.task.name!r} "
             f"({have}); summary.json records no targets")
    return task


def _first_missing(path: str) -> str | None:
    """The topmost directory that creating `path` would create (to undo it), or None if it exists."""
    missing = None
    while not os.path.exists(path):
        missing, parent = path, os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return missing


def _print_result(summary: dict, run_dir: str) -> None:
    best = summary.get("best", {})
    parts = [f"{name} {best[name]['value']:.4f} (epoch {best[name]['epoch']})" for name in sorted(best)]
    print(f"{summary.get('status', 'done')}: {summary.get('final_step')} steps, {summary.get('final_epoch')} epochs "
          f"in {summary.get('wall_seconds', 0):.1f}s; best " + ", ".join(parts), flush=True)
    print(f"run directory: {run_dir}", flush=True)


def cli() -> None:
    run_cli(main, name="launcher.train")


if __name__ == "__main__":
    cli()
