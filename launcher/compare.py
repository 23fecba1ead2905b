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
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from launcher.config import affects_training
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

__all__ = ["Run", "UsageError", "compare_runs", "group_runs", "load_runs", "plot_runs", "read_local",
           "read_wandb_offline", "read_wandb_online", "read_wandb_records", "render", "run_stats", "train_recipes"]

DEFAULT_TARGETS = (0.5, 0.8, 0.9, 0.95)
FORMATS = ("table", "markdown", "csv", "json")

# Runs that differ only by these keys are seeds of one setup (the seed does change what a run learns).
_GROUPED_OVER = ("train.seed",)
_PLAN_KEYS_THAT_MATTER = ("plan.num_processes", "plan.global_batch")

# ---------------------------------------------------------------------------------------------
# Numbers
# ---------------------------------------------------------------------------------------------


def higher_is_better(metric: str) -> bool:
    from launcher.tracking import higher_is_better as better

    return better(metric)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def run_stats(run: Run, metric: str, targets: list[float]) -> dict[str, Any]:
    """What the table shows for one run, computed from its rows.

    `epochs_to/T` (`steps_to/T`, `seconds_to/T`): the epoch (step, elapsed seconds) of the first
    evaluation with metric >= T (<= T for lower-is-better metrics such as losses), None if never.
    `final_lr`: the LR of the last optimizer step. `wall_seconds`: elapsed time at the last logged row.
    """
    up = higher_is_better(metric)
    evals = [r for r in run.rows if _number(r.get(metric)) is not None]
    train = [r for r in run.rows if _number(r.get("lr")) is not None]
    out: dict[str, Any] = {"name": run.name, "source": run.source, "seed": run.config.get("train.seed"),
                           "num_evals": len(evals)}
    values = [float(r[metric]) for r in evals]
    best_i = (max if up else min)(range(len(values)), key=values.__getitem__) if values else None
    out["best"] = values[best_i] if values else None
    out["best_epoch"] = evals[best_i].get("epoch") if values else None
    out["final"] = values[-1] if values else None
    out["final_epoch"] = max((r.get("epoch", 0) for r in run.rows), default=None)
    out["final_step"] = max((r.get("step", 0) for r in run.rows), default=None)
    out["final_lr"] = float(train[-1]["lr"]) if train else None
    elapsed = [_number(r.get("time/elapsed")) for r in run.rows]
    elapsed = [e for e in elapsed if e is not None]
    out["wall_seconds"] = elapsed[-1] if elapsed else _number(run.summary.get("wall_seconds"))
    for t in targets:
        hit = next((r for r in evals if (r[metric] >= t if up else r[metric] <= t)), None)
        out[f"epochs_to/{t:g}"] = hit.get("epoch") if hit else None
        out[f"steps_to/{t:g}"] = hit.get("step") if hit else None
        out[f"seconds_to/{t:g}"] = _number(hit.get("time/elapsed")) if hit else None
    return out


def _matters(key: str) -> bool:
    """Whether a config key can change what a run learns (beyond its seed).

    Recipe keys answer through `launcher.config.affects_training`; of the plan, only the process
    count and the global batch (the rest follows from the recipe); W&B's own `_...` keys never; a key
    this version does not know (a run from another version) always.
    """
    if key in _GROUPED_OVER or key.startswith("_"):
        return False
    if key.startswith("plan."):
        return key in _PLAN_KEYS_THAT_MATTER
    try:
        return affects_training(key)
    except KeyError:
        return True


def _setup_key(run: Run) -> tuple | None:
    """What must match for two runs to be seeds of one setup; None (never grouped) without a config."""
    if not run.config:
        return None
    return tuple(sorted((k, json.dumps(v, sort_keys=True, default=str)) for k, v in run.config.items() if _matters(k)))


def group_runs(runs: list[Run]) -> list[list[int]]:
    """Indices of runs that differ only by seed, in order of first appearance."""
    groups: dict[Any, list[int]] = {}
    for i, run in enumerate(runs):
        key = _setup_key(run)
        groups.setdefault(key if key is not None else ("run", i), []).append(i)
    return list(groups.values())


def _labels(runs: list[Run], groups: list[list[int]]) -> list[str]:
    labels = []
    for members in groups:
        names = {runs[i].config.get("name") for i in members}
        label = next(iter(names)) if len(names) == 1 and None not in names and "" not in names else runs[members[0]].name
        labels.append(str(label))
    for label in set(labels):
        same = [g for g, lab in enumerate(labels) if lab == label]
        if len(same) < 2:
            continue
        for g in same:  # same recipe name, different settings: say what differs
            cfg = runs[groups[g][0]].config
            others = [runs[groups[o][0]].config for o in same if o != g]
            diff = [k for k in sorted(cfg) if _matters(k) and any(o.get(k) != cfg[k] for o in others)]
            labels[g] = f"{label} [{', '.join(f'{k}={cfg[k]}' for k in diff[:4])}]" if diff else f"{label} #{g + 1}"
    return labels


QUANTITIES = ("best", "final", "wall_seconds", "final_lr", "final_epoch", "final_step")


def _spread(values: list[Any]) -> dict[str, Any]:
    nums = [float(v) for v in values if _number(v) is not None]
    if not nums:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    return {"mean": statistics.fmean(nums), "std": statistics.stdev(nums) if len(nums) > 1 else 0.0,
            "min": min(nums), "max": max(nums), "n": len(nums)}


def compare_runs(runs: list[Run], metric: str, targets: list[float]) -> dict[str, Any]:
    """The whole comparison as plain data: per run, per group (mean/std/min/max/n) and ratios."""
    per_run = [run_stats(r, metric, targets) for r in runs]
    groups = group_runs(runs)
    labels = _labels(runs, groups)
    target_keys = [f"{kind}_to/{t:g}" for t in targets for kind in ("epochs", "steps", "seconds")]
    out_groups = []
    for label, members in zip(labels, groups):
        stats = {q: _spread([per_run[i][q] for i in members]) for q in (*QUANTITIES, *target_keys)}
        seeds = [per_run[i]["seed"] for i in members]
        for i in members:
            per_run[i]["group"] = label
        out_groups.append({"label": label, "n": len(members), "seeds": seeds,
                           "runs": [per_run[i]["name"] for i in members], "stats": stats})
    ratios = []
    base = out_groups[0]
    for g in out_groups[1:]:
        entry: dict[str, Any] = {"group": g["label"], "baseline": base["label"]}
        for key in target_keys:
            b, o = base["stats"][key]["mean"], g["stats"][key]["mean"]
            entry[key] = b / o if b and o else None  # > 1: the group needs fewer
        b, o = base["stats"]["best"]["mean"], g["stats"]["best"]["mean"]
        entry["best_difference"] = o - b if b is not None and o is not None else None
        ratios.append(entry)
    return {"metric": metric, "higher_is_better": higher_is_better(metric), "targets": list(targets),
            "runs": per_run, "groups": out_groups, "ratios": ratios}


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------


def _target_name(t: float, metric: str) -> str:
    return f"{t * 100:g}%" if higher_is_better(metric) and 0 < t <= 1 else f"{t:g}"


def _fmt(value: float | None, kind: str) -> str:
    if value is None:
        return "-"
    if kind == "int":
        return f"{value:.0f}" if float(value).is_integer() else f"{value:.1f}"
    if kind == "lr":
        return f"{value:.3g}"
    if kind == "sec":
        return f"{value:.1f}"
    return f"{value:.4f}"


def _cell(stat: dict[str, Any], n: int, kind: str) -> str:
    if stat["n"] == 0:
        return "-"
    text = _fmt(stat["mean"], kind)
    if n > 1:
        text += f" ± {_fmt(stat['std'], kind)}"
    if stat["n"] < n:
        text += f" ({stat['n']}/{n})"
    return text


def _tables(result: dict[str, Any]) -> list[tuple[list[str], list[list[str]]]]:
    metric, targets = result["metric"], result["targets"]
    names = [_target_name(t, metric) for t in targets]
    head = ["run", "n", f"best {metric}", f"final {metric}", *[f"epochs to {n}" for n in names],
            "wall s", "final lr"]
    head2 = ["run", *[f"steps to {n}" for n in names], *[f"seconds to {n}" for n in names]]
    rows, rows2 = [], []
    for g in result["groups"]:
        s, n = g["stats"], g["n"]
        rows.append([g["label"], str(n), _cell(s["best"], n, "val"), _cell(s["final"], n, "val"),
                     *[_cell(s[f"epochs_to/{t:g}"], n, "int") for t in targets],
                     _cell(s["wall_seconds"], n, "sec"), _cell(s["final_lr"], n, "lr")])
        rows2.append([g["label"], *[_cell(s[f"steps_to/{t:g}"], n, "int") for t in targets],
                      *[_cell(s[f"seconds_to/{t:g}"], n, "sec") for t in targets]])
    return [(head, rows), (head2, rows2)]


def ratio_lines(result: dict[str, Any]) -> list[str]:
    """"fast vs baseline: 3.0x fewer epochs to 80% (4 vs 12), ..." for each group after the first."""
    metric = result["metric"]
    lines = []
    groups = {g["label"]: g for g in result["groups"]}
    for r in result["ratios"]:
        base, other = groups[r["baseline"]]["stats"], groups[r["group"]]["stats"]
        parts = []
        for t in result["targets"]:
            name = _target_name(t, metric)
            key = f"epochs_to/{t:g}"
            b, o = base[key]["mean"], other[key]["mean"]
            if b is None and o is None:
                continue
            if b is None:
                parts.append(f"reached {name} (baseline did not)")
            elif o is None:
                parts.append(f"did not reach {name} (baseline did, in {_fmt(b, 'int')} epochs)")
            else:
                ratio = r[key]
                word = "as many" if abs(ratio - 1) < 0.05 else (
                    f"{ratio:.1f}x fewer" if ratio > 1 else f"{1 / ratio:.1f}x more")
                secs = r[f"seconds_to/{t:g}"]
                speed = "" if not secs else (f", {secs:.1f}x less time" if secs >= 1 else f", {1 / secs:.1f}x more time")
                parts.append(f"{word} epochs to {name} ({_fmt(o, 'int')} vs {_fmt(b, 'int')}{speed})")
        if r["best_difference"] is not None:
            parts.append(f"best {metric} {other['best']['mean']:.4f} vs {base['best']['mean']:.4f} "
                         f"({r['best_difference']:+.4f})")
        lines.append(f"{r['group']} vs {r['baseline']}: " + ("; ".join(parts) or "no common numbers"))
    return lines


def render(result: dict[str, Any], fmt: str) -> str:
    if fmt == "json":
        return json.dumps(result, indent=2)
    tables = _tables(result)
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf)
        keys = list(result["groups"][0]["stats"]) if result["groups"] else []
        writer.writerow(["run", "n", "seeds", *[f"{k}{suffix}" for k in keys for suffix in ("", "_std", "_min", "_max")]])
        for g in result["groups"]:
            cells = [g["label"], g["n"], " ".join(str(s) for s in g["seeds"])]
            for k in keys:
                st = g["stats"][k]
                cells += ["" if st[x] is None else f"{st[x]:.6g}" for x in ("mean", "std", "min", "max")]
            writer.writerow(cells)
        return buf.getvalue().rstrip("\n")
    out = []
    for head, rows in tables:
        if fmt == "markdown":
            out.append("| " + " | ".join(head) + " |")
            out.append("|" + "|".join("---" for _ in head) + "|")
            out += ["| " + " | ".join(r) + " |" for r in rows]
        else:
            widths = [max(len(x) for x in col) for col in zip(head, *rows)]
            out.append("  ".join(h.ljust(w) for h, w in zip(head, widths)).rstrip())
            out.append("  ".join("-" * w for w in widths))
            out += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        out.append("")
    seeds_note = [f"{g['label']}: seeds {', '.join(str(s) for s in g['seeds'])}" for g in result["groups"] if g["n"] > 1]
    if seeds_note:
        out.append(("mean ± std over seeds; " if fmt == "table" else "Mean ± std over seeds; ") + "; ".join(seeds_note))
        out.append("")
    lines = ratio_lines(result)
    if fmt == "markdown":
        lines = [f"- {line}" for line in lines]
    out += lines
    return "\n".join(out).rstrip("\n")


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
