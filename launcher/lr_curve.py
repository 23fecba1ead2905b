"""The LR range test's curve: the LR of each step, smoothing, the suggestion and the plot (no torch)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


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
