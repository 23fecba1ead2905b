"""Metrics: `metrics.jsonl` always, plus W&B / TensorBoard when enabled, on the main process only.

Non-main ranks get a `NullTracker` (every method does nothing), so the training loop never asks
"am I rank 0?". The x-axis everywhere is the optimizer step: W&B rows are logged with
`step=row["step"]`, TensorBoard scalars with `global_step=row["step"]`.

The local log comes first and never depends on the others: W&B and TensorBoard are imported only
when enabled, and any exception they raise during a run becomes a warning while `metrics.jsonl`
goes on. W&B without credentials runs offline and says how to upload the run later.
"""

from __future__ import annotations

import json
import math
import os
import queue
import threading
import warnings
from collections.abc import Callable
from typing import Any

from launcher.config import TrackingConfig, flatten
from launcher.sinks import TensorBoardSink, WandbSink, _Sink, redact

MAX_CONSECUTIVE_FAILURES = 10
"""A sink (W&B, TensorBoard) that fails this many times in a row is switched off for the run."""


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else (1e308 if value > 0 else -1e308)
    return value


_encode = json.JSONEncoder(allow_nan=False).encode  # json.dumps' output, refusing NaN / inf


def json_line(row: dict[str, Any]) -> str:
    """One metrics.jsonl line; a non-finite float becomes null (NaN) or +-1e308 (inf), as JSON has neither."""
    try:
        return _encode(row) + "\n"
    except ValueError:
        return json.dumps({k: _clean(v) for k, v in row.items()}) + "\n"


class NullTracker:
    run_id: str | None = None

    def log_config(self, config: dict, plan: dict) -> None:
        pass

    def log(self, row: dict[str, Any]) -> None:
        pass

    def log_formatted(self, text: str, make_rows: Callable[[], list[dict[str, Any]]]) -> None:
        pass

    def flush(self, wait: bool = True) -> None:
        pass

    def set_summary(self, summary: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


class Tracker(NullTracker):
    """Writes one JSON object per line to `<run_dir>/metrics.jsonl`, and to W&B / TensorBoard if enabled.

    Rows are buffered and written on `flush()`. `flush(wait=False)` hands them to a writer thread
    and returns at once (the trainer's flushes every `train.log_every_n_steps` steps: JSON encoding
    and the W&B / TensorBoard calls run beside training); `flush()` returns when everything handed
    over is written (before every checkpoint and at the end), so a crash loses at most the rows
    since the last checkpoint, which the resumed run writes again. An error of the writer (a full
    disk) is raised by the next `flush`.

    Args:
      run_dir: the run directory (must exist).
      cfg: the `tracking` section; None = metrics.jsonl only.
      run_name: W&B run name when `tracking.wandb.name` is empty; empty = the run directory's name.
      resume_run_id: the `run_id` of the run being resumed (saved in its checkpoint), so W&B
        continues the same run instead of starting a new one.
      truncate_after_step: on resume, drop rows past this step (work the resumed run redoes). The
        rows kept are sent to W&B again when it starts: what the killed process had not yet
        written survives in metrics.jsonl, and W&B skips the steps its resumed run already holds.
    """

    def __init__(self, run_dir: str, cfg: TrackingConfig | None = None, run_name: str = "",
                 resume_run_id: str | None = None, truncate_after_step: int | None = None):
        cfg = cfg or TrackingConfig()
        self.run_dir = run_dir
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self._history: list[dict] = []
        if truncate_after_step is not None:
            self._history = self._truncate(truncate_after_step)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self._pending: list[dict] = []
        self._queue: queue.SimpleQueue | None = None
        self._writer: threading.Thread | None = None
        self._error: BaseException | None = None
        self._sent = 0  # batches handed to the writer thread (counted by the training thread)
        self._written = 0  # batches it has written (counted by the writer thread)
        self._sinks: list[_Sink] = []
        self.run_id = None
        if cfg.wandb.enabled:
            sink = WandbSink(cfg.wandb, run_dir, run_name or os.path.basename(os.path.normpath(run_dir)),
                             resume_run_id)
            if sink.mode != "disabled":
                self._sinks.append(sink)
                self.run_id = sink.run_id
        if cfg.tensorboard:
            purge_step = None if truncate_after_step is None else truncate_after_step + 1
            self._sinks.append(TensorBoardSink(os.path.join(run_dir, "tensorboard"), purge_step))

    def _truncate(self, step: int) -> list[dict]:
        """Drop rows past `step` (work redone after a resume); returns the rows kept."""
        if not os.path.exists(self.path):
            return []
        kept, rows = [], []
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    break  # a torn last line from a kill
                if row.get("step", 0) > step:
                    break
                kept.append(line if line.endswith("\n") else line + "\n")
                rows.append(row)
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(kept)
        os.replace(tmp, self.path)
        return rows

    def _each_sink(self, op: str, *args: Any) -> None:
        for sink in list(self._sinks):
            try:
                getattr(sink, op)(*args)
                sink.failures.pop(op, None)
            except Exception as err:  # a tracker backend must never stop training
                count = sink.failures[op] = sink.failures.get(op, 0) + 1
                if count == 1:
                    warnings.warn(redact(f"{sink.label}: {op} failed ({type(err).__name__}: {err}); "
                                         "metrics.jsonl continues"), RuntimeWarning, stacklevel=3)
                if count >= MAX_CONSECUTIVE_FAILURES or op == "start":
                    warnings.warn(f"{sink.label}: switched off for the rest of this run after {count} failed "
                                  f"{op} call(s) in a row; metrics.jsonl continues", RuntimeWarning, stacklevel=3)
                    self._sinks.remove(sink)
                    sink.abandon()

    def log_config(self, config: dict, plan: dict) -> None:
        """Record the resolved config and the plan (flattened to `optim.lr`, `plan.global_batch`, ...)."""
        flat = flatten(config)
        flat.update({f"plan.{k}": v for k, v in plan.items()})
        self._each_sink("start", flat)
        if self._history:
            self._each_sink("replay", self._history)
            self._history = []

    def log(self, row: dict[str, Any]) -> None:
        self._pending.append(row)

    def log_formatted(self, text: str, make_rows: Callable[[], list[dict[str, Any]]]) -> None:
        """Rows already formatted as metrics.jsonl lines (`text`, what `log` would write for them, e.g.
        launcher.rows.metrics_lines); `make_rows()` makes them as dicts where W&B / TensorBoard need them
        (in the writer thread, and only when one is on). In order with `log`'s rows."""
        self._pending.append((text, make_rows))

    def flush(self, wait: bool = True) -> None:
        """Write the rows logged so far; `wait=False`: in the writer thread, returning at once."""
        rows, self._pending = self._pending, []
        if not wait:
            if self._queue is None:
                self._queue = queue.SimpleQueue()
                self._writer = threading.Thread(target=self._write_loop, name="metrics-writer", daemon=True)
                self._writer.start()
            self._sent += 1
            self._queue.put(rows)
        else:
            if self._written < self._sent:  # everything handed over before comes first
                assert self._queue is not None
                done = threading.Event()
                self._queue.put(done)
                done.wait()
            self._write(rows)
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError(f"writing {self.path} failed: {error}") from error

    def _write(self, items: list) -> None:
        text = "".join(item[0] if isinstance(item, tuple) else json_line(item) for item in items)
        if text:
            self._file.write(text)
            self._file.flush()
        if self._sinks:
            rows = [row for item in items for row in (item[1]() if isinstance(item, tuple) else (item,))]
            if rows:
                self._each_sink("log", rows)
        self._each_sink("flush")

    def _write_loop(self) -> None:
        assert self._queue is not None
        while True:
            item = self._queue.get()
            if item is None:
                return
            if isinstance(item, threading.Event):
                item.set()
                continue
            try:
                self._write(item)
            except BaseException as err:  # raised in the training thread by the next flush
                self._error = err
            self._written += 1

    def set_summary(self, summary: dict[str, Any]) -> None:
        """Put the run's summary.json values (best, final, epochs/steps/seconds to each target) into W&B."""
        self.flush()
        self._each_sink("summary", summary_values(summary))

    def close(self) -> None:
        """Write what is left, then release the writer thread, the file and the sinks (also when that fails)."""
        try:
            self.flush()
        finally:
            if self._writer is not None and self._queue is not None:
                self._queue.put(None)
                self._writer.join()
                self._writer = self._queue = None
            self._file.close()
            self._each_sink("close")
            self._sinks.clear()


def summary_values(summary: dict[str, Any]) -> dict[str, Any]:
    """summary.json as flat W&B summary keys.

    `best/val/accuracy` (and `best/val/accuracy/epoch`, `.../step`), `final/val/loss`, `target_metric`,
    `epochs_to/0.8`, `steps_to/0.8`, `seconds_to/0.8` (absent when the target was not reached),
    and the scalars `final_lr`, `final_step`, `final_epoch`, `wall_seconds`, `status`.
    """
    out: dict[str, Any] = {k: v for k, v in summary.items() if not isinstance(v, dict | list)}
    for name, best in summary.get("best", {}).items():
        out[f"best/{name}"] = best["value"]
        out[f"best/{name}/epoch"] = best["epoch"]
        out[f"best/{name}/step"] = best["step"]
    for name, value in summary.get("final", {}).items():
        out[f"final/{name}"] = value
    targets = summary.get("targets", {})
    if targets:
        out["target_metric"] = targets.get("metric")
        for target, reached in (targets.get("reached") or {}).items():
            if reached:
                out[f"epochs_to/{target}"] = reached["epoch"]
                out[f"steps_to/{target}"] = reached["step"]
                out[f"seconds_to/{target}"] = reached["seconds"]
    return {k: _clean(v) for k, v in out.items()}


# ---------------------------------------------------------------------------------------------
# summary.json
# ---------------------------------------------------------------------------------------------


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
