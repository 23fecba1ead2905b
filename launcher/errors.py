"""User-facing errors and the one place that turns them into `exit 2`.

A `UsageError` is a mistake the user can fix (bad recipe, bad override, missing file, an output
directory that already exists). Entry points print it as one line, without a traceback, and exit
with status 2. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn

USAGE_EXIT = 2


class UsageError(ValueError):
    """A mistake in the user's input. The message names the problem and the fix."""


def is_main_process_env() -> bool:
    """True on global rank 0, or when no launcher set a rank (usable before Accelerate starts)."""
    return os.environ.get("RANK", "0") == "0"


def fail(message: str) -> NoReturn:
    """Print `error: message` once (rank 0 only) and exit with status 2."""
    if is_main_process_env():
        print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(USAGE_EXIT)


def run_cli(fn: Callable[..., Any], name: str | None = None) -> None:
    """Run `fn` under python-fire; a UsageError becomes one line on stderr and exit status 2."""
    import fire

    try:
        fire.Fire(fn, name=name)
    except UsageError as err:
        fail(str(err))
