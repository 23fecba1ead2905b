"""The numbers launcher.compare shows, computed from the logged rows: per run (time to each target,
best and final values, LR) and per setup (runs that differ only by seed, as mean/std/min/max/n),
with ratios relative to the first setup. Plain data; launcher.compare_table formats it.
"""

from __future__ import annotations

import json
import math
import statistics
from typing import Any

from launcher.config import affects_training
from launcher.runs import Run

# Runs that differ only by these keys are seeds of one setup (the seed does change what a run learns).
_GROUPED_OVER = ("train.seed",)
_PLAN_KEYS_THAT_MATTER = ("plan.num_processes", "plan.global_batch")


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
