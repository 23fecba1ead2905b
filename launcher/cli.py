"""The `launcher` console script: one command line for every tool.

    launcher train --recipe recipes/mnist1d.yaml [--optim.lr=0.005 ...]
    launcher train --num_processes 2 [--config_file accelerate_configs/cpu_ddp.yaml] --recipe R ...
    launcher schedule --recipe R [--plot lr.png] [--format json]
    launcher compare RUN_A RUN_B [--plot ab.png] [--format markdown]
    launcher find_lr --recipe R [--plot lr_find.png] [--apply tuned.yaml]
    launcher sweep ...
    launcher slurm {render,submit} --recipe R --nodes 1 --gpus_per_node 8 --time 04:00:00 [-- --a.b=v]

Each subcommand is the module of the same name (`python -m launcher.X` keeps working), imported only
when it runs, so `launcher --help` and `launcher X --help` import no torch. `train` and `find_lr` with
`--num_processes N` (N > 1) or `--config_file F` run accelerate's launcher in this process, as
`accelerate launch [--config_file F] [--num_processes N] -m launcher.X ...` would, after checking the
recipe and flags here (a mistake is one line, not one per process), and exit with the training
processes' status. Usage errors print one `error: ...` line and exit with status 2.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable

from launcher.errors import USAGE_EXIT, UsageError, fail
from launcher.preemption import PREEMPTED_EXIT

COMMANDS = {
    "train": "train a recipe (several processes: --num_processes N, --config_file F)",
    "schedule": "preview the exact LR of every step of a recipe",
    "compare": "compare runs: time to accuracy targets, best/final values, plots",
    "find_lr": "LR range test: suggest optim.lr (several processes: --num_processes N)",
    "sweep": "train a grid of recipe values and compare the runs",
    "slurm": "render or submit a Slurm job for a recipe",
    "checkpoint": "list, verify or export a run's checkpoints ([verify|export] RUN_DIR)",
}
POSITIONAL = {"checkpoint": 2}
"""Subcommands that take bare words (`launcher checkpoint verify RUN_DIR`): how many."""
LAUNCHED = ("train", "find_lr")
"""Subcommands that run under accelerate's launcher when given --num_processes or --config_file."""
LAUNCH_FLAGS = ("num_processes", "config_file")


def usage() -> str:
    lines = ["usage: launcher COMMAND [ARGS ...]   (launcher COMMAND --help for its flags)", "", "commands:"]
    width = max(map(len, COMMANDS))
    lines += [f"  {name:<{width}} {text}" for name, text in COMMANDS.items()]
    lines += ["", "Recipe keys are flags of train, schedule, find_lr (and sweep): --optim.lr=0.005.",
              "Usage errors print one line and exit with status 2."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run `launcher ARGV`; returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        return _dispatch(args)
    except UsageError as err:
        try:
            fail(str(err))
        except SystemExit as done:
            return int(done.code or 0)
    except SystemExit as done:
        code = done.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    return 0


def _dispatch(args: list[str]) -> int:
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    command, rest = args[0].replace("-", "_"), args[1:]
    if command not in COMMANDS:
        close = difflib.get_close_matches(command, list(COMMANDS), n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]}?" if close else f"; choose one of {', '.join(COMMANDS)}"
        raise UsageError(f"unknown command {args[0]!r}{hint}")
    prog = f"launcher {command}"
    if importlib.util.find_spec(f"launcher.{command}") is None:
        raise UsageError(f"{prog} is not available in this installation (no module launcher.{command})")
    if command == "slurm":
        from launcher.slurm import main as slurm_main

        return slurm_main(rest, prog=prog)
    launch, rest = split_launch_flags(rest) if command in LAUNCHED else ({}, rest)
    if launch and not _wants_help(rest):
        return launch_processes(command, launch, rest)
    module = importlib.import_module(f"launcher.{command}")
    fn = getattr(module, "main", None)
    if not callable(fn):
        return _call_cli(module, prog, rest)
    from launcher.errors import run_cli

    run_cli(fn, name=prog, argv=rest, positional=POSITIONAL.get(command))
    if command in LAUNCHED and _wants_help(rest):
        print("\nlauncher options (before or after the others):\n"
              "  --num_processes N   run N processes under accelerate's launcher (CPU: gloo; GPU: one per device)\n"
              "  --config_file F     an accelerate config, e.g. accelerate_configs/cpu_ddp.yaml")
    return 0


def _wants_help(rest: list[str]) -> bool:
    own = rest[: rest.index("--")] if "--" in rest else rest
    return any(a in ("-h", "--help") for a in own)


def _call_cli(module, prog: str, rest: list[str]) -> int:
    cli: Callable[[], None] | None = getattr(module, "cli", None)
    if cli is None:
        raise UsageError(f"{prog}: module {module.__name__} has no command line")
    saved = sys.argv
    sys.argv = [prog, *rest]
    try:
        cli()
    finally:
        sys.argv = saved
    return 0


def split_launch_flags(rest: list[str]) -> tuple[dict[str, str], list[str]]:
    """Take --num_processes and --config_file (`--flag V` or `--flag=V`) out of a subcommand's flags."""
    launch: dict[str, str] = {}
    out: list[str] = []
    i = 0
    while i < len(rest):
        token = rest[i]
        if token == "--":
            out += rest[i:]
            break
        name, eq, value = token[2:].partition("=") if token.startswith("--") else ("", "", "")
        name = name.replace("-", "_")
        if name in LAUNCH_FLAGS:
            if not eq:
                if i + 1 >= len(rest) or rest[i + 1].startswith("--"):
                    raise UsageError(f"--{name} needs a value, e.g. --{name} "
                                     f"{'2' if name == 'num_processes' else 'accelerate_configs/cpu_ddp.yaml'}")
                value = rest[i + 1]
                i += 1
            launch[name] = value
        else:
            out.append(token)
        i += 1
    if "num_processes" in launch:
        from launcher.schedule import whole_number

        n = whole_number("num_processes", launch["num_processes"], 1)
        launch["num_processes"] = str(n)
        if n == 1 and "config_file" not in launch:
            return {}, out  # one process: run in this process, no launcher
    if "config_file" in launch and not os.path.isfile(launch["config_file"]):
        raise UsageError(f"--config_file {launch['config_file']!r} not found; see accelerate_configs/")
    return launch, out


def precheck(command: str, rest: list[str]) -> None:
    """The checks a training process would make first, made once here: flags, recipe, output paths."""
    module = importlib.import_module(f"launcher.{command}")
    from launcher.errors import check_flags
    from launcher.slurm_spec import _parse_value, split_flags

    check_flags(module.main, rest, f"launcher {command}")
    own_names = {"recipe", "output_dir", "resume", "print_config", "plot", "apply", "start_lr", "end_lr",
                 "num_steps", "beta", "diverge_factor"}
    own: dict[str, object] = {}
    overrides: dict[str, object] = {}
    for key, value, token in split_flags(rest):
        if key is None:
            raise UsageError(f"unexpected argument {token!r}; write --flag=value (see launcher {command} --help)")
        (own if key in own_names else overrides)[key] = _parse_value("true" if value is None else value)
    recipe = own.get("recipe")
    if not isinstance(recipe, str):
        raise UsageError(f"--recipe is required, e.g. launcher {command} --recipe recipes/mnist1d.yaml")
    from launcher.config import load_config
    from launcher.output import check_dir

    cfg = load_config(recipe, overrides)
    output_dir = own.get("output_dir")
    if isinstance(output_dir, str):
        check_dir(output_dir, "--output_dir")
    if cfg.data.root:
        check_dir(cfg.data.root, "--data.root")


def accelerate_args(launch: dict[str, str], has_gpu: bool) -> list[str]:
    """`accelerate launch` options for --num_processes / --config_file."""
    args: list[str] = []
    if "config_file" in launch:
        args += ["--config_file", launch["config_file"]]
        if "num_processes" in launch:
            args += ["--num_processes", launch["num_processes"]]
        return args
    n = launch["num_processes"]
    if not has_gpu:
        # DESIGN: --multi_gpu with ACCELERATE_USE_CPU (launcher.distributed passes cpu=True) is what
        # starts N real gloo processes on CPU; --cpu would start one.
        os.environ["ACCELERATE_USE_CPU"] = "true"
    return ["--multi_gpu", "--num_processes", n, "--num_machines", "1", "--mixed_precision", "no",
            "--dynamo_backend", "no", "--main_process_port", "0"]


def launch_processes(command: str, launch: dict[str, str], rest: list[str]) -> int:
    """accelerate launch ... -m launcher.COMMAND REST, in this process; returns the processes' status."""
    precheck(command, rest)
    import logging

    import torch

    from launcher.output import install_warnings
    from launcher.slurm_launch import accelerate_launch

    install_warnings()
    for name in ("torch.distributed.elastic", "torch.distributed.run", "accelerate"):
        logging.getLogger(name).setLevel(logging.CRITICAL)  # a failed process already said why
    argv = [*accelerate_args(launch, torch.cuda.is_available()), "-m", f"launcher.{command}", *rest]
    status = accelerate_launch(argv)
    if status not in (0, USAGE_EXIT, PREEMPTED_EXIT):
        print(f"launcher {command}: training processes failed (exit {status})", file=sys.stderr, flush=True)
    return status


def cli() -> None:
    raise SystemExit(main())


if __name__ == "__main__":
    cli()
