"""Metrics: `metrics.jsonl` always, plus W&B / TensorBoard when enabled, on the main process only.

Non-main ranks get a `NullTracker` (every method does nothing), so the training loop never asks
"am I rank 0?". The x-axis everywhere is the optimizer step: W&B rows are logged with
`step=row["step"]`, TensorBoard scalars with `global_step=row["step"]`.

The local log comes first and never depends on the others: W&B and TensorBoard are imported only
when enabled, and any exception they raise during a run becomes a warning while `metrics.jsonl`
goes on. W&B without credentials runs offline and says how to upload the run later.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import queue
import secrets
import string
import sys
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

from launcher.config import TrackingConfig, WandbConfig, flatten
from launcher.errors import UsageError

MAX_CONSECUTIVE_FAILURES = 10
"""A sink (W&B, TensorBoard) that fails this many times in a row is switched off for the run."""


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else (1e308 if value > 0 else -1e308)
    return value


_encode = json.JSONEncoder(allow_nan=False).encode  # json.dumps' output, refusing NaN / inf


def _line(row: dict[str, Any]) -> str:
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

    def log_later(self, make_rows: Callable[[], list[dict[str, Any]]]) -> None:
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

    def log_later(self, make_rows: Callable[[], list[dict[str, Any]]]) -> None:
        """Rows made by `make_rows()` where they are written (the writer thread), in order with `log`'s."""
        self._pending.append(make_rows)

    def flush(self, wait: bool = True) -> None:
        """Write the rows logged so far; `wait=False`: in the writer thread, returning at once."""
        rows, self._pending = self._pending, []
        if not wait:
            if self._queue is None:
                self._queue = queue.SimpleQueue()
                self._writer = threading.Thread(target=self._write_loop, name="metrics-writer", daemon=True)
                self._writer.start()
            self._queue.put(rows)
        else:
            if self._queue is not None:  # everything handed over before comes first
                done = threading.Event()
                self._queue.put(done)
                done.wait()
            self._write(rows)
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError(f"writing {self.path} failed: {error}") from error

    def _write(self, rows: list[dict], share: bool = False) -> None:
        """`share` (the writer thread): let a waiting training thread take the GIL between rows, so the
        encoding fills its GIL-free time (kernels, backward) instead of holding it up for a whole flush."""
        rows = [row for item in rows for row in (item() if callable(item) else (item,))]
        if rows:
            if share:
                lines = []
                for row in rows:
                    lines.append(_line(row))
                    time.sleep(0)
                self._file.write("".join(lines))
            else:
                self._file.write("".join(map(_line, rows)))
            self._file.flush()
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
                self._write(item, share=True)
            except BaseException as err:  # raised in the training thread by the next flush
                self._error = err

    def set_summary(self, summary: dict[str, Any]) -> None:
        """Put the run's summary.json values (best, final, epochs/steps/seconds to each target) into W&B."""
        self.flush()
        self._each_sink("summary", summary_values(summary))

    def close(self) -> None:
        self.flush()
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
# Sinks: W&B and TensorBoard. Each method may raise; the Tracker turns that into a warning.
# ---------------------------------------------------------------------------------------------


class _Sink:
    label = "sink"

    @property
    def failures(self) -> dict[str, int]:
        """Consecutive failures per operation."""
        if "_failures" not in self.__dict__:
            self._failures: dict[str, int] = {}
        return self._failures

    def start(self, config: dict[str, Any]) -> None:
        pass

    def log(self, rows: list[dict[str, Any]]) -> None:
        pass

    def replay(self, rows: list[dict[str, Any]]) -> None:
        """Rows logged before a resume (from metrics.jsonl)."""

    def flush(self) -> None:
        pass

    def summary(self, values: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass

    def abandon(self) -> None:
        """Release what can be released after a failure, never raising."""
        with contextlib.suppress(Exception):
            self.close()


def new_run_id() -> str:
    """An 8-character W&B-style run id (lowercase letters and digits)."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


def have_wandb_credentials() -> bool:
    """Whether W&B could authenticate without asking: WANDB_API_KEY, an identity token, or ~/.netrc."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    try:
        import wandb
        from wandb.sdk.lib.wbauth import wbnetrc

        host = os.environ.get("WANDB_BASE_URL") or wandb.Settings().base_url
        return bool(wbnetrc.read_netrc_auth(host=host))
    except Exception:
        return False


_ENV_MODES = {"online": "online", "run": "online", "offline": "offline", "dryrun": "offline",
              "disabled": "disabled"}


def resolve_wandb_mode(mode: str) -> tuple[str, str]:
    """(mode, why): `tracking.wandb.mode`, else $WANDB_MODE, else online with credentials, else offline."""
    if mode:
        return mode, "tracking.wandb.mode"
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if env in _ENV_MODES:
        return _ENV_MODES[env], "WANDB_MODE"
    if os.environ.get("WANDB_DISABLED", "").strip().lower() in ("true", "1", "yes"):
        return "disabled", "WANDB_DISABLED"
    if have_wandb_credentials():
        return "online", "credentials found"
    return "offline", "no W&B API key found (set WANDB_API_KEY or run `wandb login`)"


def redact(text: str) -> str:
    """`text` with the W&B API key (if one is set) masked, for messages that quote W&B's errors."""
    key = os.environ.get("WANDB_API_KEY", "")
    return text.replace(key, "***") if len(key) >= 4 else text


def _note(message: str) -> None:
    print(redact(f"W&B: {message}"), file=sys.stderr, flush=True)


class WandbSink(_Sink):
    """One W&B run; x-axis = optimizer step. Started by `start()` (it needs the config)."""

    label = "W&B"

    def __init__(self, cfg: WandbConfig, run_dir: str, run_name: str, resume_run_id: str | None):
        self.cfg = cfg
        self.dir = cfg.dir or run_dir
        self.name = cfg.name or run_name
        self.mode, self.why = resolve_wandb_mode(cfg.mode)
        self.resuming = bool(resume_run_id)
        self.run_id = resume_run_id or new_run_id()
        self.run = None
        self._first_step = 0

    def _init(self, mode: str, config: dict[str, Any]):
        import wandb

        settings = {}
        if mode == "online" and not os.environ.get("WANDB_INIT_TIMEOUT"):
            settings["init_timeout"] = 30  # without a network, fall back offline in ~30 s, not 90
        return wandb.init(
            project=self.cfg.project or None, entity=self.cfg.entity or None, group=self.cfg.group or None,
            tags=list(self.cfg.tags) or None, job_type=self.cfg.job_type or None, name=self.name,
            dir=self.dir, mode=mode, id=self.run_id, resume="allow" if self.resuming else None,
            config=config, allow_val_change=True, settings=wandb.Settings(**settings))

    def start(self, config: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.config.update(config, allow_val_change=True)
            return
        os.makedirs(self.dir, exist_ok=True)
        if self.mode == "online":
            try:
                self.run = self._init("online", config)
            except Exception as err:
                first_line = (str(err).strip().splitlines() or [""])[0][:200]
                self.mode, self.why = "offline", f"online start failed: {type(err).__name__}: {first_line}"
        if self.run is None:
            self.run = self._init(self.mode, config)
        if self.mode == "offline":
            sync_dir = getattr(self.run.settings, "sync_dir", None) or self.dir
            _note(f"logging offline ({self.why}); upload later with: wandb sync {sync_dir}")
        if self.resuming:
            self._first_step = getattr(self.run, "starting_step", 0) or 0

    def log(self, rows: list[dict[str, Any]]) -> None:
        if self.run is None:
            return
        for row in rows:
            step = row.get("step")
            if step is None:
                self.run.log(row)
            elif step >= self._first_step:  # a resumed online run already holds the earlier steps
                self.run.log(row, step=int(step))

    def replay(self, rows: list[dict[str, Any]]) -> None:
        # A killed process can lose the rows W&B had not written yet; the local log has them all.
        self.log(rows)

    def summary(self, values: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.summary.update(values)

    def close(self) -> None:
        run, self.run = self.run, None
        if run is not None:
            run.finish()
            import wandb

            if wandb.run is None:  # finish() returns before the run files are complete; this waits for them
                wandb.teardown()


class TensorBoardSink(_Sink):
    """Scalars under `<run_dir>/tensorboard` (global_step = optimizer step); config and summary as text."""

    label = "TensorBoard"

    def __init__(self, log_dir: str, purge_step: int | None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UsageError("tracking.tensorboard=true needs the tensorboard package: pip install tensorboard, "
                             "or set --tracking.tensorboard=false") from None

        # purge_step: after a resume, TensorBoard hides the events past the checkpoint that the run redoes.
        self.writer = SummaryWriter(log_dir=log_dir, purge_step=purge_step)

    def start(self, config: dict[str, Any]) -> None:
        lines = ["| key | value |", "|---|---|"] + [f"| {k} | {json.dumps(v)} |" for k, v in config.items()]
        self.writer.add_text("config", "\n".join(lines))

    def log(self, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            step = row.get("step")
            for key, value in row.items():
                if key == "step" or isinstance(value, bool) or not isinstance(value, int | float):
                    continue
                self.writer.add_scalar(key, value, global_step=step)

    def flush(self) -> None:
        self.writer.flush()

    def summary(self, values: dict[str, Any]) -> None:
        self.writer.add_text("summary", "```\n" + json.dumps(values, indent=2) + "\n```")

    def close(self) -> None:
        self.writer.close()


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
