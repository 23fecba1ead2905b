"""A sweep's results: one row per point (mean ± std over seeds, a 95% CI from 3 seeds on), the best
point as a diff against the recipe, sweep.md / sweep.json / sweep.png, `--apply`, and W&B.

Numbers come from launcher.compare's `run_stats` (computed from each run's metrics.jsonl rows);
the plot from launcher.plots.
"""

from __future__ import annotations

import math
import statistics
import sys
from pathlib import Path
from typing import Any

from launcher.compare import _cell, _parse_targets, _target_name, higher_is_better, run_stats
from launcher.errors import UsageError
from launcher.runs import completed, read_local

# Two-sided 95% Student t quantiles by degrees of freedom (n - 1); 1.96 beyond the table.
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}


def t95(df: int) -> float:
    known = [d for d in _T95 if d <= df]
    return _T95[max(known)] if df <= 30 else 1.96


def spread(values: list[Any]) -> dict[str, Any]:
    """mean, std, min, max, n and (n >= 3) the 95% confidence interval of the mean."""
    nums = [float(v) for v in values if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)]
    if not nums:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0, "ci95": None}
    mean = statistics.fmean(nums)
    std = statistics.stdev(nums) if len(nums) > 1 else 0.0
    half = t95(len(nums) - 1) * std / math.sqrt(len(nums)) if len(nums) >= 3 else None
    return {"mean": mean, "std": std, "min": min(nums), "max": max(nums), "n": len(nums),
            "ci95": [mean - half, mean + half] if half is not None else None}


def metric_and_targets(cfg, metric: str | None, targets: str | None, target: float | None) -> tuple[str, list[float]]:
    if metric is not None and not str(metric).strip():
        raise UsageError("--metric: must name a logged metric, e.g. val/accuracy")
    metric = str(metric or cfg.tracking.target_metric or "val/accuracy")
    target_list = _parse_targets(targets) or _parse_targets(list(cfg.tracking.targets)) or [0.5, 0.8, 0.9]
    if target is not None:
        if not math.isfinite(target) or target <= 0:
            raise UsageError(f"--target: expected a positive number, e.g. --target 0.9; got {target!r}")
        target_list = sorted(set(target_list) | {target})
    return metric, target_list


def summarize(out: Path, state: dict[str, Any], metric: str, targets: list[float], target: float | None) -> dict:
    """Per point: the swept values, the seeds that completed, and the spread of every number."""
    up = higher_is_better(metric)
    per_run = {}
    for entry in state["runs"]:
        run_dir = out / entry["dir"]
        if completed(run_dir):
            per_run[entry["dir"]] = run_stats(read_local(run_dir), metric, targets)
    if target is None:  # the highest target some run reached
        reached = [t for t in targets if any(s.get(f"steps_to/{t:g}") is not None for s in per_run.values())]
        target = (max(reached) if up else min(reached)) if reached else targets[0]
    points: dict[str, dict[str, Any]] = {}
    for entry in state["runs"]:
        p = points.setdefault(entry["point"], {"point": entry["point"], "values": entry["values"], "runs": [],
                                               "seeds": [], "planned": 0})
        p["planned"] += 1
        if entry["dir"] in per_run:
            p["runs"].append(entry["dir"])
            p["seeds"].append(entry["seed"])
    keys = ["best", "final", "wall_seconds"] + [f"{k}_to/{t:g}" for t in targets for k in ("epochs", "steps", "seconds")]
    for p in points.values():
        p["n"] = len(p["runs"])
        p["stats"] = {k: spread([per_run[r].get(k) for r in p["runs"]]) for k in keys}
    ranked = [p for p in points.values() if p["stats"]["best"]["mean"] is not None]
    steps_key = f"steps_to/{target:g}"
    ranked.sort(key=lambda p: ((-1 if up else 1) * p["stats"]["best"]["mean"],
                               p["stats"][steps_key]["mean"] if p["stats"][steps_key]["mean"] is not None else math.inf))
    return {"metric": metric, "higher_is_better": up, "random": state.get("random") is not None, "targets": targets, "target": target, "keys": state["keys"],
            "points": list(points.values()), "best": ranked[0]["point"] if ranked else None,
            "per_run": per_run}


def _val(value: Any) -> str:
    return "-" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def table(result: dict[str, Any]) -> str:
    metric, target = result["metric"], result["target"]
    tname = _target_name(target, metric)
    head = [*result["keys"], "n", f"best {metric}", "95% CI", f"final {metric}", f"epochs to {tname}",
            f"steps to {tname}", f"seconds to {tname}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for p in result["points"]:
        s, n = p["stats"], p["planned"]
        ci = s["best"]["ci95"]
        cells = [_val(p["values"][k]) for k in result["keys"]]
        cells += [f"{p['n']}" if p["n"] == n else f"{p['n']}/{n}", _cell(s["best"], p["n"], "val"),
                  f"{ci[0]:.4f} - {ci[1]:.4f}" if ci else "-", _cell(s["final"], p["n"], "val"),
                  _cell(s[f"epochs_to/{target:g}"], p["n"], "int"), _cell(s[f"steps_to/{target:g}"], p["n"], "int"),
                  _cell(s[f"seconds_to/{target:g}"], p["n"], "sec")]
        if p["point"] == result["best"]:
            cells = [f"**{c}**" for c in cells]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def best_diff(result: dict[str, Any], recipe: str, overrides: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The values to write (overrides the sweep ran with + the best point) and `key: old -> new` lines."""
    from launcher.config import flatten, load_config, to_dict

    best = next(p for p in result["points"] if p["point"] == result["best"])
    values = best["values"] | {k: v for k, v in overrides.items() if k not in ("train.progress_bar", *best["values"])}
    recipe_flat = flatten(to_dict(load_config(recipe)))
    new_flat = flatten(to_dict(load_config(recipe, values)))
    values = {k: new_flat.get(k, v) for k, v in values.items()}  # as the config reads them
    lines = []
    for key in values:
        old, new = recipe_flat.get(key), new_flat.get(key)
        lines.append(f"  {key}: {_val(old)} -> {_val(new)}" if old != new else f"  {key}: {_val(new)} (as in the recipe)")
    return values, lines


def report(out: Path, state: dict[str, Any], cfg, metric: str, targets: list[float], apply: str | None,
           cfg_overrides: dict[str, Any], target: float | None = None) -> int:
    """Write sweep.md, sweep.json and sweep.png, print the table and the best point; 0, or 1 if runs are missing."""
    from launcher.plots import plot_sweep
    from launcher.sweep import _write_state

    result = summarize(out, state, metric, targets, target)
    done = sum(p["n"] for p in result["points"])
    planned = len(state["runs"])
    if done == 0:
        print(f"sweep: no completed runs in {out} yet; nothing to report", file=sys.stderr)
        return 1
    if all(p["stats"]["best"]["n"] == 0 for p in result["points"]):
        raise UsageError(f"--metric: {metric!r} is not in the runs' metrics; pick a logged val/... metric")
    plot_path = out / "sweep.png"
    plot_sweep(result, str(plot_path))
    text = table(result)
    best = next(p for p in result["points"] if p["point"] == result["best"])
    values, diff = best_diff(result, state["recipe"], cfg_overrides)
    b = best["stats"]["best"]
    headline = (f"best: {best['point']} ({metric} {b['mean']:.4f}" + (f" ± {b['std']:.4f}" if best["n"] > 1 else "")
                + f" over {best['n']} seed(s)); against {state['recipe']}:")
    note = "" if done == planned else f"\n\n{planned - done} of {planned} runs are not completed yet; rerun the sweep."
    md = (f"# Sweep of {state['recipe']}\n\n{len(result['points'])} points x {len(state['seeds'])} seeds; "
          f"{metric}, mean ± std over seeds (95% CI of the mean where n >= 3); steps to "
          f"{_target_name(result['target'], metric)}.\n\n{text}\n\n{headline}\n\n```\n" + "\n".join(diff)
          + f"\n```\n\n![sweep](sweep.png){note}\n")
    (out / "sweep.md").write_text(md)
    _write_state(out, state, {"results": {k: v for k, v in result.items() if k != "per_run"},
                              "per_run": result["per_run"], "best_values": values})
    print(text)
    print(f"\n{headline}")
    print("\n".join(diff))
    print(f"\nwrote {out}/sweep.md, sweep.json and sweep.png{note}", flush=True)
    _log_wandb(out, cfg, result, plot_path, state.get("group"))
    if apply is not None:
        _apply(state["recipe"], apply, values)
    return 0 if done == planned else 1


def _apply(recipe: str, path: str, values: dict[str, Any]) -> None:
    from launcher.recipe_edit import check_apply as _check_apply
    from launcher.recipe_edit import recipe_with

    problem = _check_apply(path)
    if problem:
        raise UsageError(problem)
    text, kept = recipe_with(recipe, values)
    with open(path, "x") as f:  # never overwrite, even if the file appeared meanwhile
        f.write(text)
    note = "" if kept else " (written as plain YAML: the recipe's comments could not be kept)"
    print(f"wrote {path}: {recipe} with {', '.join(f'{k}={_val(v)}' for k, v in values.items())}{note}", flush=True)


def _log_wandb(out: Path, cfg, result: dict[str, Any], plot_path: Path, group: str | None) -> None:
    """With W&B on in the recipe: one more run in the sweep's group with the table, the plot and the best point."""
    if not cfg.tracking.wandb.enabled:
        return
    from launcher.sinks import resolve_wandb_mode

    mode, _ = resolve_wandb_mode(cfg.tracking.wandb.mode)
    if mode == "disabled":
        return
    try:
        import wandb

        w = cfg.tracking.wandb
        run = wandb.init(project=w.project, entity=w.entity or None, group=group or out.resolve().name, job_type="sweep",
            name=f"{out.resolve().name}-sweep", dir=str(out), mode=mode, tags=["sweep"],
            config={"sweep.keys": result["keys"], "sweep.metric": result["metric"], "sweep.best": result["best"]},
            settings=wandb.Settings(quiet=True))
        keys = result["keys"]
        columns = [*keys, "n", "best_mean", "best_std", f"steps_to_{result['target']:g}_mean"]
        rows = [[p["values"][k] for k in keys] + [p["n"], p["stats"]["best"]["mean"], p["stats"]["best"]["std"],
                p["stats"][f"steps_to/{result['target']:g}"]["mean"]] for p in result["points"]]
        run.log({"sweep/table": wandb.Table(columns=columns, data=rows), "sweep/plot": wandb.Image(str(plot_path))})
        run.summary["sweep/best"] = result["best"]
        run.finish()
    except Exception as err:  # W&B trouble never costs the sweep's results
        print(f"warning: could not log the sweep to W&B ({type(err).__name__}: {str(err)[:200]})", file=sys.stderr)
