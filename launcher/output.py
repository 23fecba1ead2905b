"""What the command-line tools print besides their results, and from which rank: warnings, checks of
output paths, and decisions the main process makes for every rank.

Warnings: every `warnings.warn` (ours, and the few from torch / accelerate worth reading) is printed
as one line, `warning: <message>`, by the main process only (global rank 0, or a run without a
launcher), and each message once per process. Known noise is dropped; `NOISE` lists it.

Output paths: `check_dir` and `check_file` refuse, before anything is written, a path that cannot
be created or written (a parent that is a file, a directory without write permission, a file where
a directory is needed and the reverse), naming the flag; `make_parents` creates a plot's directory
and turns a late filesystem error into the same one-line UsageError.

Ranks: `main_print` prints from the main process only; `agree` lets the main process decide and
every rank learn the decision (a problem becomes the same UsageError on every rank);
`let_main_rank_report_first` keeps the other ranks alive long enough for rank 0's one-line error to
be printed. Exit statuses are launcher.errors.USAGE_EXIT (2) and launcher.preemption's
PREEMPTED_EXIT (124) and NONFINITE_EXIT (3); none of this imports torch.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from typing import Any

from launcher.errors import UsageError, is_main_process_env

NOISE: tuple[tuple[str, type[Warning]], ...] = (
    # torch, gloo on CPU: asks for a device id that CPU process groups do not have.
    (r".*No device id is provided via `init_process_group` or `barrier`.*", UserWarning),
    (r".*barrier\(\): using the device under current context.*", UserWarning),
    # torch: deprecation notices from inside torch / accelerate, not from the recipe.
    (r".*TypedStorage is deprecated.*", UserWarning),
    (r".*torch\.cuda\.amp\.GradScaler\(args\.\.\.\)` is deprecated.*", FutureWarning),
    (r".*torch\.cpu\.amp\.autocast\(args\.\.\.\)` is deprecated.*", FutureWarning),
    # torch DataLoader on a machine with few cores (data.num_workers is the recipe's choice).
    (r".*This DataLoader will create \d+ worker processes in total.*", UserWarning),
    # accelerate: launcher.cli passes every launch value explicitly; the reminder adds nothing.
    (r".*The following values were not passed to `accelerate launch`.*", UserWarning),
)
"""(message regex, category) pairs that are dropped: torch / accelerate notices that say nothing
about the recipe or the run (documented in docs/cli.md)."""

_seen: set[str] = set()


def _show(message: Any, category: type[Warning], filename: str, lineno: int, file: Any = None,
          line: str | None = None) -> None:
    if not is_main_process_env():
        return
    text = " ".join(str(message).split())
    if text in _seen:
        return
    _seen.add(text)
    print(f"warning: {text}", file=sys.stderr, flush=True)


def install_warnings() -> None:
    """Print warnings as one `warning: ...` line from the main process, each once; drop NOISE."""
    warnings.showwarning = _show
    for pattern, category in NOISE:
        warnings.filterwarnings("ignore", message=pattern, category=category)


def warn(message: str) -> None:
    """One `warning: ...` line from the main process (for messages that are not Python warnings)."""
    _show(message, UserWarning, "", 0)


def _first_existing(path: str) -> str:
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def check_dir(path: str, flag: str, shown: str | None = None) -> None:
    """UsageError unless `path` is a directory or can be created, and can be written.

    `shown` is the path the user gave when `path` is derived from it (a file's directory)."""
    full = os.path.abspath(os.path.expanduser(str(path)))
    shown = str(path) if shown is None else shown
    if os.path.exists(full) and not os.path.isdir(full):
        if shown != str(path):
            raise UsageError(f"{flag} {shown!r}: {full!r} is a file, not a directory; choose another {flag}")
        raise UsageError(f"{flag} {shown!r} exists and is not a directory; choose another {flag}")
    base = _first_existing(full)
    if not os.path.isdir(base):
        raise UsageError(f"{flag} {shown!r}: {base!r} is a file, not a directory; choose another {flag}")
    if not os.access(base, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {shown!r}: cannot write in {base!r} (permission denied); "
                         f"choose another {flag}")


def check_file(path: str, flag: str) -> None:
    """UsageError unless `path` can be written as a file (its directory is created when needed)."""
    text = str(path)
    full = os.path.abspath(os.path.expanduser(text))
    if not text.strip() or text.endswith(("/", os.sep)):
        raise UsageError(f"{flag} {text!r} must name a file, e.g. {flag} out/lr.png")
    if os.path.isdir(full):
        raise UsageError(f"{flag} {text!r} is a directory; name a file, e.g. {flag} {os.path.join(text, 'lr.png')}")
    if os.path.exists(full) and not os.access(full, os.W_OK):
        raise UsageError(f"{flag} {text!r} cannot be overwritten (permission denied); choose another {flag}")
    check_dir(os.path.dirname(full), flag, shown=text)


PLOT_FORMATS = ("png", "pdf", "svg", "svgz", "jpg", "jpeg", "eps", "ps", "tif", "tiff", "webp", "pgf")
"""File extensions matplotlib writes (a name without one is written as PNG)."""


def check_plot(path: str, flag: str = "--plot") -> None:
    """check_file, plus an extension matplotlib can write."""
    check_file(path, flag)
    ext = os.path.splitext(str(path))[1].lower().lstrip(".")
    if ext and ext not in PLOT_FORMATS:
        raise UsageError(f"{flag} {str(path)!r}: matplotlib cannot write .{ext} files; use one of "
                         f".{', .'.join(PLOT_FORMATS[:4])} (e.g. {flag} lr.png)")


def make_parents(path: str, flag: str) -> str:
    """Create the directory that will hold the file `path`; return the path with ~ expanded."""
    full = os.path.expanduser(str(path))
    parent = os.path.dirname(os.path.abspath(full))
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as err:
        raise UsageError(f"{flag} {str(path)!r}: cannot create {parent!r} ({err.strerror}); "
                         f"choose another {flag}") from None
    return full


def makedirs(path: str, flag: str) -> None:
    """os.makedirs(path, exist_ok=True), with a filesystem error as a one-line UsageError."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as err:
        raise UsageError(f"{flag} {str(path)!r}: cannot create it ({err.strerror}); choose another {flag}") from None


# ---------------------------------------------------------------------------------------------
# Ranks: who prints, who decides
# ---------------------------------------------------------------------------------------------


def main_print(accelerator: Any, message: str, *, stderr: bool = False) -> None:
    """Print `message` (flushed) from the main process only."""
    if accelerator.is_main_process:
        print(message, file=sys.stderr if stderr else sys.stdout, flush=True)


def let_main_rank_report_first(seconds: float) -> None:
    """Every rank hits the same mistake at once and only rank 0 reports it; torchrun stops the whole
    job when the first process exits, so the other ranks wait `seconds` before they exit: otherwise
    rank 0 may be killed unheard. Returns at once on rank 0 and in a run of one process."""
    if not is_main_process_env() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        time.sleep(seconds)


def agree(accelerator, decide) -> Any:
    """The main process decides, every rank learns the decision, a problem is a UsageError on every rank.

    `decide()` runs on the main process only and returns (value, problem or None). Every rank must
    call `agree` together: a rank that raised alone would leave the others waiting in a collective.
    """
    decision: list[Any] = list(decide()) if accelerator.is_main_process else [None, None]
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(decision, from_process=0)
    value, problem = decision
    if problem:
        raise UsageError(problem)
    return value
