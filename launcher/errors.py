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
    elif int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Every rank hits the same mistake at once; the first to exit makes torchrun kill the others.
        # Let rank 0 print its line first.
        import time

        time.sleep(3)
    raise SystemExit(USAGE_EXIT)


def run_cli(fn: Callable[..., Any], name: str | None = None) -> None:
    """Run `fn` under python-fire; a UsageError becomes one line on stderr and exit status 2."""
    import sys

    if any(arg in ("-h", "--help") for arg in sys.argv[1:]):
        # fire hands --help to a function with **kwargs as an override; answer it here instead.
        print(help_text(fn, name or fn.__module__))
        return
    import fire

    try:
        fire.Fire(fn, name=name)
    except UsageError as err:
        fail(str(err))


def help_text(fn: Callable[..., Any], name: str) -> str:
    """`usage:` line from the signature, then the docstring."""
    import inspect

    flags = []
    for p in inspect.signature(fn).parameters.values():
        if p.kind is p.VAR_KEYWORD:
            flags.append("[--section.key=value ...]")
        elif p.kind is p.VAR_POSITIONAL:
            flags.append(f"[{p.name.upper()} ...]")
        elif p.default is inspect.Parameter.empty:
            flags.append(p.name.upper())
        elif p.default is False:
            flags.append(f"[--{p.name}]")
        else:
            flags.append(f"[--{p.name} {p.name.upper()}]")
    return f"usage: python -m {name} {' '.join(flags)}\n\n{inspect.getdoc(fn) or ''}"
