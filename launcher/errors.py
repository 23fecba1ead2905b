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
    else:
        from launcher.output import let_main_rank_report_first

        let_main_rank_report_first(3)
    raise SystemExit(USAGE_EXIT)


def exit_with(main: Callable[[], int | None]) -> NoReturn:
    """Run an argparse entry point: its status becomes the exit status, a UsageError one line and 2."""
    try:
        status = main()
    except UsageError as err:
        fail(str(err))
    raise SystemExit(status)


def run_cli(fn: Callable[..., Any], name: str | None = None, argv: list[str] | None = None,
            positional: int | None = None) -> None:
    """Run `fn` under python-fire; a UsageError becomes one line on stderr and exit status 2.

    Before fire sees the command line, every `--flag` is checked: the function's own flags, dotted
    recipe keys (checked by the config layer) and top-level recipe keys pass; anything else is an
    unknown flag, reported with the closest flag or recipe key.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    name = name or fn.__module__
    own_args = args[: args.index("--")] if "--" in args else args
    if any(arg in ("-h", "--help") for arg in own_args):
        # fire hands --help to a function with **kwargs as an override; answer it here instead.
        print(help_text(fn, name))
        return
    from launcher.output import install_warnings

    install_warnings()
    try:
        check_flags(fn, args, name, positional)
        import fire

        fire.Fire(fn, command=args, name=name)
    except UsageError as err:
        fail(str(err))


def _flag_names(fn: Callable[..., Any]) -> tuple[list[str], bool]:
    import inspect

    names, var_kw = [], False
    for p in inspect.signature(fn).parameters.values():
        if p.kind is p.VAR_KEYWORD:
            var_kw = True
        elif p.kind is not p.VAR_POSITIONAL:
            names.append(p.name)
    return names, var_kw


def check_flags(fn: Callable[..., Any], args: list[str], name: str, positional: int | None = None) -> None:
    """UsageError for a `--flag` that is neither the tool's own nor a recipe key, with a suggestion."""
    import difflib

    own, var_kw = _flag_names(fn)
    _check_positionals(fn, args, name, positional)
    for arg in args:
        if arg == "--":
            break
        if not arg.startswith("--") or len(arg) < 3:
            continue
        flag = arg[2:].split("=", 1)[0].replace("-", "_")
        if flag in own or (flag.startswith("no") and flag[2:] in own):
            continue
        if var_kw and "." in flag:
            continue  # a recipe key: the config layer checks it and suggests the closest one
        from launcher.config import closest_key, valid_keys

        top_level = [k for k in valid_keys() if "." not in k]
        if var_kw and flag in top_level:
            continue
        candidates = [f"--{n}" for n in own] + ([f"--{k}" for k in top_level] if var_kw else [])
        close = difflib.get_close_matches(f"--{flag}", candidates, n=1, cutoff=0.6)
        if not close and var_kw:
            key = closest_key(flag)
            close = [f"--{key}"] if key else []
        hint = f"; did you mean {close[0]}?" if close else f"; see `{_prog(name)} --help`"
        raise UsageError(f"unknown flag --{flag} for {_prog(name)}{hint}")


def _check_positionals(fn: Callable[..., Any], args: list[str], name: str, positional: int | None = None) -> None:
    """fire hands a bare word to the next parameter not given as a flag (`--recipe R oops` would make
    `oops` the output directory). Allowed: the first `positional` parameters as bare words (by default
    the recipe as the first word when --recipe is absent)."""
    import inspect

    params = inspect.signature(fn).parameters.values()
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return
    words, flags = [], set()
    i = 0
    while i < len(args) and args[i] != "--":
        arg = args[i]
        if arg.startswith("--") and len(arg) > 2:
            flag, eq, _ = arg[2:].partition("=")
            flags.add(flag.replace("-", "_"))
            if not eq and i + 1 < len(args) and not args[i + 1].startswith("--"):
                i += 1  # fire reads the next word as this flag's value
        elif not (arg.startswith("-") and _is_number(arg)):
            words.append(arg)
        i += 1
    first = next(iter(params), None)
    if positional is not None:
        allowed = len([p for p in list(params)[:positional] if p.name not in flags])
    else:
        allowed = 1 if first is not None and first.name == "recipe" and "recipe" not in flags else 0
    if len(words) > allowed:
        extra = words[allowed]
        raise UsageError(f"unexpected argument {extra!r}; flags are written --name=value "
                         f"(e.g. --output_dir {extra}); see `{_prog(name)} --help`")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _prog(name: str) -> str:
    return name if name.startswith("launcher ") else f"python -m {name}"


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
    return f"usage: {_prog(name)} {' '.join(flags)}\n\n{inspect.getdoc(fn) or ''}"
