"""Metrics: `metrics.jsonl` always, plus W&B / TensorBoard when enabled, on the main process only.

Non-main ranks get a `NullTracker` (every method does nothing), so the training loop never asks
"am I rank 0?". The x-axis everywhere is the optimizer step.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else (1e308 if value > 0 else -1e308)
    return value


class NullTracker:
    run_id: str | None = None

    def log_config(self, config: dict, plan: dict) -> None:
        pass

    def log(self, row: dict[str, Any]) -> None:
        pass

    def flush(self) -> None:
        pass

    def set_summary(self, summary: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


class Tracker(NullTracker):
    """Writes one JSON object per line to `<run_dir>/metrics.jsonl`.

    Rows are buffered and written on `flush()` (the trainer flushes at log intervals, at epoch ends
    and before every checkpoint), so a crash loses at most the rows since the last checkpoint,
    which the resumed run writes again.
    """

    def __init__(self, run_dir: str, truncate_after_step: int | None = None):
        self.run_dir = run_dir
        self.path = os.path.join(run_dir, "metrics.jsonl")
        if truncate_after_step is not None:
            self._truncate(truncate_after_step)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self._pending: list[dict] = []

    def _truncate(self, step: int) -> None:
        """Drop rows past `step` (work redone after a resume), keeping rows up to the checkpoint."""
        if not os.path.exists(self.path):
            return
        kept = []
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    break  # a torn last line from a kill
                if row.get("step", 0) > step:
                    break
                kept.append(line if line.endswith("\n") else line + "\n")
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(kept)
        os.replace(tmp, self.path)

    def log(self, row: dict[str, Any]) -> None:
        self._pending.append(row)

    def flush(self) -> None:
        if not self._pending:
            return
        lines = [json.dumps({k: _clean(v) for k, v in row.items()}) + "\n" for row in self._pending]
        self._pending.clear()
        self._file.writelines(lines)
        self._file.flush()

    def close(self) -> None:
        self.flush()
        self._file.close()


def higher_is_better(metric: str) -> bool:
    name = metric.lower()
    return any(s in name for s in ("acc", "f1", "auc", "precision", "recall", "bleu", "score"))


class RunSummary:
    """Final and best values, and when the target metric first reached each target (summary.json)."""

    def __init__(self, cfg):
        self.targets = sorted(cfg.targets)
        self.target_metric = cfg.target_metric
        self.best: dict[str, dict] = {}
        self.final: dict[str, float] = {}
        self.reached: dict[str, dict | None] = {f"{t:g}": None for t in self.targets}

    def update(self, metrics: dict[str, float], epoch: int, step: int, seconds: float) -> None:
        self.final = dict(metrics)
        for name, value in metrics.items():
            if value is None or (isinstance(value, float) and math.isnan(value)):
                continue
            best = self.best.get(name)
            better = best is None or (value > best["value"] if higher_is_better(name) else value < best["value"])
            if better:
                self.best[name] = {"value": value, "epoch": epoch, "step": step}
        value = metrics.get(self.target_metric)
        if value is None:
            return
        up = higher_is_better(self.target_metric)
        for t in self.targets:
            key = f"{t:g}"
            if self.reached[key] is None and (value >= t if up else value <= t):
                self.reached[key] = {"epoch": epoch, "step": step, "seconds": round(seconds, 3)}

    def result(self, **extra) -> dict:
        return {**extra, "final": self.final, "best": self.best,
                "targets": {"metric": self.target_metric, "reached": self.reached}}

    def state_dict(self) -> dict:
        return {"best": self.best, "final": self.final, "reached": self.reached}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.final, self.reached = state["best"], state["final"], state["reached"]
