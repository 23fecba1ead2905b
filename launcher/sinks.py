"""Where metrics go besides metrics.jsonl: W&B and TensorBoard, one `_Sink` each.

Each method may raise; `launcher.tracking.Tracker` turns that into a warning and, after
`MAX_CONSECUTIVE_FAILURES` in a row, switches the sink off while metrics.jsonl goes on. W&B is
imported only when enabled; without credentials it runs offline and says how to upload the run.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import string
import sys
from typing import Any

from launcher.config import WandbConfig
from launcher.errors import UsageError


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
