"""Sweeps: train a recipe at every point of a grid (or N random points) x seeds, and find the best.

    python -m launcher.sweep --recipe recipes/mnist1d.yaml --grid optim.lr=1e-3,5e-3,1e-2 \\
        --grid schedule.decay_rate=0.9,0.96 --seeds 3 [--output_dir D] [--parallel K] [--a.b=v ...]
    python -m launcher.sweep --recipe R --random 8 --grid optim.lr=1e-4:1e-1 --grid schedule.decay_rate=0.85:0.99
    python -m launcher.sweep --recipe R --grid ... --slurm --time 01:00:00 [--partition P] [--dry_run]

Every point x seed is an ordinary run directory `D/<values>-seed<S>` (e.g. `lr0.005-decay_rate0.9-seed1`),
trained by launcher.orchestrate (one after another, or `--parallel K` at once; each run a plain
process or `accelerate launch --config_file C`). The same command again skips completed runs and
resumes interrupted ones. With `--slurm` the points become one sbatch job array
(launcher/slurm_array.py). Results (launcher/sweep_results.py): D/sweep.md, D/sweep.json,
D/sweep.png, the best point as a diff against the recipe, and `--apply out.yaml`.

The command line is parsed with argparse (a repeated `--grid` is needed, which fire cannot give);
every `--section.key=value` it does not know is a training override applied to every run.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import re
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher.errors import UsageError, exit_with
from launcher.orchestrate import Job, check_output_dir, launch_prefix, override_text, run_jobs

_RANGE = re.compile(r"^\s*([^:,]+):([^:,]+)\s*$")
_LOG_KEYS = ("lr", "weight_decay")


@dataclass(frozen=True)
class Point:
    """One run of the sweep: the swept values and the seed."""

    values: dict[str, Any]
    seed: int
    name: str

    @property
    def label(self) -> str:
        """The point without its seed (the run directory name minus `-seed<S>`)."""
        return self.name.rsplit("-seed", 1)[0]

    def override_tokens(self) -> list[str]:
        return [f"--{k}={override_text(v)}" for k, v in self.values.items()] + [f"--train.seed={self.seed}"]


# ---------------------------------------------------------------------------------------------
# Points
# ---------------------------------------------------------------------------------------------


def _value(text: str) -> Any:
    from launcher.slurm import _parse_value

    return _parse_value(text.strip())


def parse_grid(items: list[str], random_points: int | None) -> dict[str, Any]:
    """`key=v1,v2` -> {key: [v1, v2]}; with --random also `key=lo:hi` -> {key: (lo, hi)}."""
    grid: dict[str, Any] = {}
    for item in items:
        key, eq, values = item.partition("=")
        key = key.strip().lstrip("-")
        if not eq or not key or not values.strip():
            raise UsageError(f"--grid {item!r}: write --grid section.key=v1,v2,... (or lo:hi with --random N)")
        if key in grid:
            raise UsageError(f"--grid {key} is given twice; give each key once with all its values")
        if key in ("train.seed", "seed"):
            raise UsageError("--grid train.seed: seeds are swept by --seeds N (seeds <recipe seed> .. +N-1)")
        match = _RANGE.match(values)
        if match:
            if random_points is None:
                raise UsageError(f"--grid {item!r}: a range lo:hi needs --random N (a grid takes v1,v2,...)")
            lo, hi = _value(match.group(1)), _value(match.group(2))
            if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in (lo, hi)) or not lo < hi:
                raise UsageError(f"--grid {item!r}: a range needs two numbers lo < hi, e.g. {key}=1e-4:1e-1")
            if _log_scale(key) and lo <= 0:
                raise UsageError(f"--grid {item!r}: {key} is sampled log-uniformly, so the range must be positive")
            grid[key] = (lo, hi)
        else:
            choices = [_value(v) for v in values.split(",") if v.strip()]
            if len({json.dumps(c, default=str) for c in choices}) != len(choices):
                raise UsageError(f"--grid {item!r}: a value is listed twice")
            grid[key] = choices
    return grid


def _log_scale(key: str) -> bool:
    leaf = key.rsplit(".", 1)[-1]
    return leaf.endswith(_LOG_KEYS)


def sample(grid: dict[str, Any], n: int, sampler_seed: int) -> list[dict[str, Any]]:
    """`n` random points: ranges log-uniform for LRs and weight decay, uniform otherwise (integers
    when both ends are), lists uniformly; values rounded to 3 significant digits; no duplicates."""
    rng = random.Random(sampler_seed)
    points: list[dict[str, Any]] = []
    seen = set()
    for _ in range(n * 20):
        if len(points) == n:
            break
        point = {}
        for key, spec in grid.items():
            if isinstance(spec, tuple):
                lo, hi = spec
                if isinstance(lo, int) and isinstance(hi, int):
                    point[key] = rng.randint(lo, hi)
                elif _log_scale(key):
                    point[key] = float(f"{math.exp(rng.uniform(math.log(lo), math.log(hi))):.3g}")
                else:
                    point[key] = float(f"{rng.uniform(lo, hi):.3g}")
            else:
                point[key] = rng.choice(spec)
        key = json.dumps(point, sort_keys=True, default=str)
        if key not in seen:
            seen.add(key)
            points.append(point)
    return points


def _text(value: Any) -> str:
    text = f"{value:g}" if isinstance(value, float) else override_text(value)
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", text).strip("-") or "x"


def point_names(keys: list[str]) -> dict[str, str]:
    """Short names for the swept keys in run directory names: the last part, or more where two share it."""
    names = {}
    for key in keys:
        parts = key.split(".")
        depth = 1
        while depth < len(parts) and sum(k.split(".")[-depth:] == parts[-depth:] for k in keys) > 1:
            depth += 1
        names[key] = "_".join(parts[-depth:])
    return names


def make_points(values: list[dict[str, Any]], seeds: list[int]) -> list[Point]:
    keys = list(values[0]) if values else []
    short = point_names(keys)
    points = []
    for v in values:
        label = "-".join(f"{short[k]}{_text(v[k])}" for k in keys) or "recipe"
        points += [Point(values=v, seed=s, name=f"{label}-seed{s}") for s in seeds]
    return points


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:
        raise UsageError(f"{message} (see python -m launcher.sweep --help)")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m launcher.sweep", allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
                description="Train a recipe over a grid (or random points) x seeds; compare; apply the best.",
                epilog="Any other --section.key=value is a training override for every run, e.g. "
                       "--train.num_epochs=10.\nSee docs/sweep.md.")
    p.add_argument("--recipe", required=True, help="recipe YAML")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="a swept key and its values (repeat for more keys: the cartesian product); "
                        "with --random also KEY=LO:HI")
    p.add_argument("--random", type=int, metavar="N", help="N random points instead of the whole grid "
                   "(ranges log-uniform for *lr and *weight_decay keys, uniform otherwise)")
    p.add_argument("--sampler_seed", type=int, default=0, help="seed of the --random sampler (default 0)")
    p.add_argument("--seeds", type=int, default=1, help="runs per point: train.seed = recipe seed + 0 .. N-1")
    p.add_argument("--output_dir", help="the sweep directory (default runs/sweep-<recipe>-<time>); "
                   "rerunning with the same one continues the sweep")
    p.add_argument("--parallel", type=int, default=1, help="runs at once (local), or tasks at once (--slurm)")
    p.add_argument("--accelerate_config", help="launch each run with accelerate launch --config_file C")
    p.add_argument("--num_processes", type=int, help="processes per run (with --accelerate_config; on Slurm: "
                   "CPU processes per task)")
    p.add_argument("--metric", help="the target metric (default: the recipe's tracking.target_metric)")
    p.add_argument("--targets", help="targets, e.g. 0.8,0.9 (default: the recipe's tracking.targets)")
    p.add_argument("--target", type=float, help="the target for steps-to-target in the table and plot "
                   "(default: the highest target some run reached)")
    p.add_argument("--apply", metavar="OUT.yaml", help="write the recipe with the best point's values to a new file")
    s = p.add_argument_group("Slurm (one job array, one point x seed per task; see slurm/README.md)")
    s.add_argument("--slurm", action="store_true", help="submit the sweep as an sbatch job array")
    s.add_argument("--time", help="time limit per task, HH:MM:SS")
    s.add_argument("--nodes", type=int, default=1, help="nodes per task: 1 (a sweep's points run on one node each)")
    s.add_argument("--gpus_per_node", type=int, default=0, help="GPUs per task (default 0: CPU)")
    s.add_argument("--partition")
    s.add_argument("--account")
    s.add_argument("--job_name", help="default: the sweep directory's name")
    s.add_argument("--cpus_per_task", type=int)
    s.add_argument("--max_requeues", type=int, default=10)
    s.add_argument("--signal_seconds", type=int)
    s.add_argument("--dry_run", action="store_true", help="print the batch script (without --slurm: the training "
                   "commands); write, submit and train nothing")
    return p


def _positive(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UsageError(f"--{name} must be an integer >= {minimum}; got {value!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit status (a UsageError escapes to the caller)."""
    from launcher.config import load_config
    from launcher.slurm import parse_overrides

    argv = list(sys.argv[1:] if argv is None else argv)
    args, rest = _parser().parse_known_args(argv)
    rest = [t for t in rest if t != "--"]
    overrides = parse_overrides(rest)
    for key in overrides:
        if key in ("train.seed", "seed"):
            raise UsageError("--train.seed cannot be overridden in a sweep: --seeds N trains seeds <recipe seed> .. +N-1")
    if not Path(args.recipe).is_file():
        raise UsageError(f"recipe file not found: {args.recipe!r}; see recipes/")
    _positive("seeds", args.seeds)
    _positive("parallel", args.parallel)
    if args.random is not None:
        _positive("random", args.random)
    if not args.slurm:
        slurm_only = [f"--{k}" for k in ("time", "partition", "account", "job_name", "cpus_per_task", "signal_seconds")
                      if getattr(args, k) is not None] + (["--gpus_per_node"] if args.gpus_per_node else [])
        if slurm_only:
            raise UsageError(f"{', '.join(slurm_only)} apply only with --slurm (a job array); add --slurm or drop them")
    if not args.grid:
        raise UsageError("nothing to sweep: give at least one --grid section.key=v1,v2 (e.g. --grid optim.lr=1e-3,1e-2)")
    grid = parse_grid(args.grid, args.random)
    if args.random is None:
        values = [dict(zip(grid, combo)) for combo in itertools.product(*grid.values())]
    else:
        values = sample(grid, args.random, args.sampler_seed)
    base = load_config(args.recipe, overrides)
    seeds = [base.train.seed + k for k in range(args.seeds)]
    points = make_points(values, seeds)
    for point in points[:: len(seeds)]:  # every point loads with the recipe before anything runs
        load_config(args.recipe, {**overrides, **point.values})
    if len({p.name for p in points}) != len(points):
        raise UsageError("two points get the same run directory name; use values that differ in their text")
    if overrides.get("train.progress_bar") is None:
        overrides["train.progress_bar"] = "off"  # logs, not a terminal

    from launcher.recipe_edit import check_apply as _check_apply
    from launcher.sweep_results import metric_and_targets

    if args.apply is not None and _check_apply(args.apply):
        raise UsageError(_check_apply(args.apply))
    metric, targets = metric_and_targets(base, args.metric, args.targets, args.target)

    out = check_output_dir(args.output_dir or Path("runs", f"sweep-{Path(args.recipe).stem}-"
                                                          f"{time.strftime('%Y%m%d-%H%M%S')}"))
    state = {"recipe": args.recipe, "overrides": {k: override_text(v) for k, v in overrides.items()},
             "grid": {k: list(v) if isinstance(v, tuple) else v for k, v in grid.items()},
             "random": args.random, "sampler_seed": args.sampler_seed if args.random else None,
             "seeds": seeds, "keys": list(grid),
             "runs": [{"dir": p.name, "point": p.label, "values": p.values, "seed": p.seed} for p in points]}
    group = str(overrides.get("tracking.wandb.group") or out.resolve().name)
    state["group"] = group
    _check_same_sweep(out, state)
    common = [f"--{k}={override_text(v)}" for k, v in overrides.items()
              if k not in ("tracking.wandb.group", "tracking.wandb.tags")]  # both set per run below
    common.append(f"--tracking.wandb.group={group}")

    def wandb_tags(point: Point) -> str:
        tags = list(base.tracking.wandb.tags) + ["sweep"] + [f"{k}={override_text(v)}" for k, v in point.values.items()]
        return "--tracking.wandb.tags=" + ",".join(tags)

    again = shlex.join(["python", "-m", "launcher.sweep", *argv] + ([] if args.output_dir else ["--output_dir", str(out)]))
    if args.slurm:
        from launcher.slurm_array import submit_array

        tasks = [(out.resolve() / p.name, [*common, *p.override_tokens(), wandb_tags(p)]) for p in points]
        if not submit_array(args, out, tasks, rest, again, state):
            return 0  # submitted (or printed with --dry_run); the report comes when the same command runs again
    else:
        prefix = launch_prefix(args.accelerate_config, args.num_processes)
        jobs = [Job(out / p.name, ["--recipe", args.recipe, *common, *p.override_tokens(), wandb_tags(p)],
                    what=f"{p.label} seed {p.seed}") for p in points]
        if args.dry_run:  # the commands, nothing written
            for job in jobs:
                print(shlex.join([*prefix, "-m", "launcher.train", *job.args, "--output_dir", str(job.run_dir)]))
            return 0
        out.mkdir(parents=True, exist_ok=True)
        _write_state(out, state)
        print(f"sweep: {len(values)} point(s) x {len(seeds)} seed(s) = {len(jobs)} runs in {out}", flush=True)
        failed = run_jobs(jobs, out / "logs", prefix, args.parallel, continue_hint=f"run: {again}")
        if failed and len(failed) == len(jobs):
            return 1

    from launcher.sweep_results import report

    return report(out, state, base, metric, targets, args.apply, cfg_overrides=overrides, target=args.target)


def _check_same_sweep(out: Path, state: dict[str, Any]) -> None:
    path = out / "sweep.json"
    if not path.is_file():
        if out.is_dir() and any(out.iterdir()):
            raise UsageError(f"--output_dir {str(out)!r} is not empty and holds no sweep; choose another --output_dir")
        return
    try:
        old = json.loads(path.read_text()).get("sweep", {})
    except ValueError:
        raise UsageError(f"{path} is not valid JSON; fix or remove it, or choose another --output_dir") from None
    mine = json.loads(json.dumps(state, default=str))
    if {k: old.get(k) for k in mine} != mine:
        differs = [k for k in mine if old.get(k) != mine[k]]
        raise UsageError(f"{out} holds a different sweep ({', '.join(differs)} differ); rerun that sweep's own "
                         "command, or choose another --output_dir")


def _write_state(out: Path, state: dict[str, Any], results: dict[str, Any] | None = None) -> None:
    data = {"sweep": state, "runs": state["runs"], **(results or {})}
    tmp = out / "sweep.json.tmp"
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    tmp.replace(out / "sweep.json")


def cli() -> None:
    if any(a in ("-h", "--help") for a in sys.argv[1:]):
        _parser().print_help()
        return
    exit_with(main)


if __name__ == "__main__":
    cli()
