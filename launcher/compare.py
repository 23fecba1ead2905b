"""Compare runs: time to accuracy targets, best and final values, LR; one table and one plot.

    python -m launcher.compare RUN [RUN ...] [--targets 0.5,0.8,0.9] [--metric val/accuracy]
                               [--plot out.png] [--format table|markdown|csv|json]
    python -m launcher.compare --train recipes/mnist1d_baseline.yaml recipes/mnist1d_fast.yaml
                               [--seeds 3] [--output_dir runs/compare-X] [--a.b=v ...]

A RUN is a local run directory (config.yaml, metrics.jsonl, summary.json), a folder of them (a sweep
or a `--train` output), a W&B offline run (`wandb/offline-run-*` or its `run-*.wandb` file; a `wandb/`
folder reads every run in it), or a W&B path `entity/project/run_id` or `entity/project/group:NAME`
(needs network and an API key); see launcher/runs.py. Training many runs is launcher/orchestrate.py.

Every number is computed from the logged rows themselves, not taken from summary.json: the epochs
(and steps, seconds) to a target are those of the first evaluation at which the metric reached it.
Runs whose configs differ only in `train.seed` (and in keys that do not change training: the run
name, tracking, checkpointing, data loading) form one group, shown as mean ± std over n seeds.
Ratios are relative to the first group: "3.0x fewer epochs to 80%".

The numbers are launcher.compare_stats, their formatting launcher.compare_table, the plot
launcher.plots; this module is the command line.
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from launcher.compare_stats import (
    QUANTITIES,
    _matters,
    compare_runs,
    group_runs,
    higher_is_better,
    run_stats,
)
from launcher.compare_table import _cell, _target_name, ratio_lines, render
from launcher.errors import UsageError, run_cli
from launcher.orchestrate import train_recipes
from launcher.plots import plot_runs
from launcher.runs import (
    Run,
    load_runs,
    read_local,
    read_wandb_offline,
    read_wandb_online,
    read_wandb_records,
)

__all__ = ["QUANTITIES", "Run", "UsageError", "_cell", "_matters", "_parse_targets", "_target_name", "compare_runs",
           "group_runs", "higher_is_better", "load_runs", "plot_runs", "ratio_lines", "read_local",
           "read_wandb_offline", "read_wandb_online", "read_wandb_records", "render", "run_stats", "train_recipes"]

DEFAULT_TARGETS = (0.5, 0.8, 0.9, 0.95)
FORMATS = ("table", "markdown", "csv", "json")

# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def _parse_targets(targets: Any) -> list[float] | None:
    if targets is None:
        return None
    items = list(targets) if isinstance(targets, list | tuple) else str(targets).replace(",", " ").split()
    try:
        values = [float(t) for t in items]
    except (TypeError, ValueError):
        raise UsageError(f"--targets: expected numbers separated by commas, e.g. --targets 0.5,0.8,0.9; "
                         f"got {targets!r}") from None
    if not values or not all(math.isfinite(v) and v > 0 for v in values):
        raise UsageError(f"--targets: expected positive numbers, e.g. --targets 0.5,0.8,0.9; got {targets!r}")
    return sorted(set(values))


def main(*runs: str, targets: Any = None, metric: str | None = None, plot: str | None = None,
         format: str = "table", train: Any = None, seeds: int = 1, output_dir: str | None = None,
         **overrides: Any) -> None:
    """Compare runs: epochs, steps and seconds to accuracy targets, best/final values, LR; table + plot.

    Args:
      runs: run directories (metrics.jsonl), folders of them (a sweep, a --train output), W&B offline
        runs (wandb/offline-run-*), or W&B paths entity/project/run_id or entity/project/group:NAME.
        With --train: recipe files to train.
      targets: metric targets, e.g. 0.5,0.8,0.9 (default: the first run's tracking.targets).
      metric: the evaluation metric (default: the first run's tracking.target_metric, else val/accuracy).
      plot: write LR, metric and train loss against epoch for all runs to this PNG (three panels).
      format: table, markdown, csv or json.
      train: train the given recipes first (each x --seeds) with launcher.train, then compare them.
      seeds: with --train, runs per recipe (train.seed = recipe seed + 0 .. seeds-1); the same
        setup's seeds are shown as mean ± std.
      output_dir: with --train, where the runs go (default runs/compare-<timestamp>); rerunning the
        same command skips completed runs. Also holds compare.md, compare.json and compare.png.
      overrides: with --train, dotted recipe keys applied to every recipe, e.g. --train.num_epochs=30
    """
    specs = [str(r) for r in runs]
    if train not in (None, False):
        if train is not True:
            specs = [str(t) for t in (train if isinstance(train, list | tuple) else [train])] + specs
    elif overrides:
        key = next(iter(overrides))
        raise UsageError(f"unknown option --{key}; recipe overrides (--a.b=v) apply only with --train; "
                         "see python -m launcher.compare --help")
    if format not in FORMATS:
        raise UsageError(f"--format: must be one of {', '.join(FORMATS)}; got {format!r}")
    target_list = _parse_targets(targets)
    if metric is not None and not str(metric).strip():
        raise UsageError("--metric: must name a logged metric, e.g. val/accuracy")
    if not specs:
        raise UsageError("nothing to compare: pass run directories (python -m launcher.compare RUN_A RUN_B), "
                         "or recipes with --train")
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise UsageError(f"--seeds: expected a whole number >= 1; got {seeds!r}")

    if train not in (None, False):
        for recipe in specs:
            if not Path(recipe).is_file():
                raise UsageError(f"recipe file not found: {recipe!r}; --train takes recipe files (see recipes/)")
        output_dir = output_dir or os.path.join("runs", f"compare-{time.strftime('%Y%m%d-%H%M%S')}")
        specs = train_recipes(specs, seeds, output_dir, overrides)
        if not specs:
            raise SystemExit(1)
        plot = plot or os.path.join(output_dir, "compare.png")
    elif output_dir is not None or seeds != 1:
        raise UsageError("--output_dir and --seeds apply only with --train")

    loaded: list[Run] = []
    for spec in specs:
        loaded += load_runs(spec)
    first = loaded[0].config
    metric = str(metric or first.get("tracking.target_metric") or "val/accuracy")
    if target_list is None:
        target_list = _parse_targets(first.get("tracking.targets")) or list(DEFAULT_TARGETS)
    if not any(metric in row for run in loaded for row in run.rows):
        known = sorted({k for run in loaded for row in run.rows for k in row if k.startswith("val/")})
        raise UsageError(f"--metric: {metric!r} is not in any run's metrics; logged: {', '.join(known) or 'none'}")
    result = compare_runs(loaded, metric, target_list)
    for g in result["groups"]:
        if len(set(map(str, g["seeds"]))) < len(g["seeds"]):
            print(f"note: {g['label']} holds runs with the same seed ({', '.join(g['runs'])}); the same run given "
                  "twice (e.g. its directory and its W&B log) counts twice", file=sys.stderr)
    if plot:
        plot_runs(loaded, result, plot)
        result["plot"] = plot
    print(render(result, format))
    if train not in (None, False):
        Path(output_dir, "compare.md").write_text(render(result, "markdown") + "\n")
        Path(output_dir, "compare.json").write_text(render(result, "json") + "\n")
        print(f"\nwrote {output_dir}/compare.md, compare.json and {plot}", file=sys.stderr)
    elif plot:
        print(f"\nwrote {plot}", file=sys.stderr)


def cli() -> None:
    run_cli(main, name="launcher.compare")


if __name__ == "__main__":
    cli()
