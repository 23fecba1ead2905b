"""Plots: the comparison's LR / metric / loss panels, and a sweep's metric and steps-to-target per swept key."""

from __future__ import annotations

import math
import os
import statistics
from typing import Any

from launcher.runs import Run


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> None:
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    fig.savefig(path, dpi=110)



def plot_runs(runs: list[Run], result: dict[str, Any], path: str):
    """LR, the metric and the train loss (epoch means) against epoch, one colour per group; returns the figure."""
    plt = _pyplot()
    metric = result["metric"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    ax_lr, ax_metric, ax_loss = axes
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    labels = [g["label"] for g in result["groups"]]
    sizes = {g["label"]: g["n"] for g in result["groups"]}
    seen = set()
    for run, stats in zip(runs, result["runs"]):
        group = stats.get("group", run.name)
        color = colors[labels.index(group) % len(colors)] if group in labels else None
        label = None
        if group not in seen:
            seen.add(group)
            label = f"{group} (n={sizes[group]})" if sizes.get(group, 1) > 1 else group
        alpha = 0.9 if sizes.get(group, 1) == 1 else 0.55
        train = [r for r in run.rows if _number(r.get("lr")) is not None and _number(r.get("epoch")) is not None]
        ax_lr.plot([r["epoch"] for r in train], [r["lr"] for r in train], color=color, alpha=alpha, label=label)
        evals = [r for r in run.rows if _number(r.get(metric)) is not None]
        ax_metric.plot([r["epoch"] for r in evals], [r[metric] for r in evals], marker="." if len(evals) < 40 else None,
                       color=color, alpha=alpha, label=label)
        epochs: dict[int, list[float]] = {}
        for r in run.rows:
            loss = _number(r.get("train/loss"))
            if loss is not None and _number(r.get("epoch")) is not None:
                epochs.setdefault(max(1, math.ceil(r["epoch"])), []).append(loss)
        xs = sorted(epochs)
        ax_loss.plot(xs, [statistics.fmean(epochs[x]) for x in xs], color=color, alpha=alpha, label=label)
    for t in result["targets"]:
        ax_metric.axhline(t, color="grey", lw=0.6, ls=":")
    ax_lr.set(title="learning rate (every optimizer step)", xlabel="epoch", ylabel="lr")
    ax_metric.set(title=metric, xlabel="epoch", ylabel=metric)
    ax_loss.set(title="train loss (epoch mean)", xlabel="epoch", ylabel="train/loss")
    losses = [y for line in ax_loss.get_lines() for y in line.get_ydata()]
    if losses and min(losses) > 0 and max(losses) / min(losses) > 10:
        ax_loss.set_yscale("log")
    for ax in axes:
        ax.grid(alpha=0.3)
    ax_metric.legend(fontsize="small")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return fig


def _series(points: list[dict[str, Any]], keys: list[str], key: str) -> dict[str, list[dict[str, Any]]]:
    """Points grouped by the values of the other swept keys (one line each), sorted along `key`."""
    lines: dict[str, list[dict[str, Any]]] = {}
    for p in points:
        others = ", ".join(f"{k.rsplit('.', 1)[-1]}={p['values'][k]}" for k in keys if k != key)
        lines.setdefault(others or "mean", []).append(p)
    for members in lines.values():
        members.sort(key=lambda p: p["values"][key] if isinstance(p["values"][key], int | float) else str(p["values"][key]))
    return lines


def plot_sweep(result: dict[str, Any], path: str):
    """Two rows against each swept key: the best metric and the steps to the target, mean over seeds
    with error bars (the 95% CI where n >= 3, else ± std); one line per setting of the other keys."""
    plt = _pyplot()
    keys, metric, target = result["keys"], result["metric"], result["target"]
    rows = (("best", f"best {metric}"), (f"steps_to/{target:g}", f"steps to {metric} {target:g}"))
    fig, axes = plt.subplots(2, len(keys), figsize=(4.6 * len(keys), 6.4), squeeze=False)
    random_search = bool(result.get("random"))  # random points: no lines through them
    for col, key in enumerate(keys):
        for row, (stat, title) in enumerate(rows):
            ax = axes[row][col]
            groups = {"points": result["points"]} if random_search else _series(result["points"], keys, key)
            colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
            for i, (label, members) in enumerate(groups.items()):
                xs, ys, lo, hi = [], [], [], []
                for p in members:
                    s = p["stats"][stat]
                    if s["mean"] is None:
                        continue
                    x = p["values"][key]
                    xs.append(x if isinstance(x, int | float) else str(x))
                    ys.append(s["mean"])
                    low, high = s["ci95"] if s.get("ci95") else (s["mean"] - s["std"], s["mean"] + s["std"])
                    lo.append(s["mean"] - low)
                    hi.append(high - s["mean"])
                if xs:
                    ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=label, color=colors[i % len(colors)],
                                ls="none" if random_search else "-")
            numeric = [p["values"][key] for p in result["points"] if isinstance(p["values"][key], int | float)]
            if numeric and min(numeric) > 0 and max(numeric) / min(numeric) >= 10:
                ax.set_xscale("log")
            ax.set(xlabel=key, ylabel=title if col == 0 else None)
            ax.set_title(f"{title} vs {key}", fontsize="medium")
            ax.grid(alpha=0.3)
            if row == 0 and len(groups) > 1 and not random_search:
                ax.legend(fontsize="x-small")
    n = max((p["planned"] for p in result["points"]), default=1)
    fig.suptitle(f"mean over {n} seed(s); bars: {'95% CI' if n >= 3 else '± std'}", fontsize="small")
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    _save(fig, path)
    plt.close(fig)
    return fig
