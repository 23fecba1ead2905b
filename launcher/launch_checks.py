"""Launch-configuration checks made before the Accelerator exists: the precision the hardware can
run, the world size the launcher set, and a launcher that asked for several processes but started one.

`accelerate launch --cpu --num_processes 2` (or a `use_cpu: true` / MULTI_CPU config) starts ONE
process: `check_single_process_launch` reads the launch command of the parent process and stops
with the fix. fp16 on CPU is silently ignored by Accelerate: `resolve_mixed_precision` refuses it.
"""

from __future__ import annotations

import contextlib
import io
import os

from launcher.errors import UsageError

CPU_DDP_HINT = "accelerate launch --config_file accelerate_configs/cpu_ddp.yaml -m launcher.train ..."


def resolve_mixed_precision(requested: str, has_gpu: bool) -> str:
    mp = requested
    if mp == "auto":
        mp = os.environ.get("ACCELERATE_MIXED_PRECISION", "no") or "no"
    if mp not in ("no", "bf16", "fp16"):
        raise UsageError(f"train.mixed_precision: {mp!r} (from the accelerate config) is not supported; use no, bf16 or fp16")
    if mp == "fp16" and not has_gpu:
        raise UsageError("train.mixed_precision: fp16 needs a GPU (on CPU Accelerate silently ignores it); "
                         "use --train.mixed_precision=bf16 or no")
    return mp


def _expected_world_size() -> int:
    for var in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE"):
        if os.environ.get(var):
            return int(os.environ[var])
    return 1


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").strip().lower() in ("true", "1", "yes")


# ---------------------------------------------------------------------------------------------
# A launcher that asked for several processes but started one
# ---------------------------------------------------------------------------------------------


def _launch_args(argv: list[str]) -> list[str] | None:
    """The arguments after `accelerate launch` in a command line, or None if it is not one."""
    for i, arg in enumerate(argv):
        name = os.path.basename(arg)
        if name == "accelerate-launch" or arg == "accelerate.commands.launch":
            return argv[i + 1:]
        launcher = name == "accelerate" or arg in ("accelerate.commands.accelerate_cli", "launcher.slurm")
        if launcher and argv[i + 1:i + 2] == ["launch"]:
            return argv[i + 2:]
    return None


def requested_processes(argv: list[str], cwd: str = ".") -> int | None:
    """How many processes the `accelerate launch` command line `argv` asked for (None: not one / unknown).

    Parsed with accelerate's own argument parser; the number comes from `--num_processes`, else from
    the config file it names (or accelerate's default config file, which it skips with `--cpu`).
    """
    rest = _launch_args(argv)
    if rest is None:
        return None
    from accelerate.commands.config.config_args import default_config_file, load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    try:
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            args, _ = launch_command_parser().parse_known_args(rest)
    except SystemExit:
        return None
    if args.num_processes is not None:
        return int(args.num_processes)
    config_file = args.config_file
    if config_file is None and os.path.isfile(default_config_file) and not args.cpu:
        config_file = default_config_file
    if config_file is None:
        return None
    try:
        return int(load_config_from_file(os.path.join(cwd, config_file)).num_processes)
    except Exception:  # an unreadable config is accelerate's problem to report, not ours
        return None


def _parent_command(pid: int) -> tuple[list[str], str] | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().decode(errors="replace").split("\0")
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return None
    if argv and argv[-1] == "":
        argv.pop()
    return argv, cwd


def check_single_process_launch(ppid: int | None = None) -> None:
    """Stop a lone process whose parent `accelerate launch` was asked for more than one.

    Accelerate runs `--cpu`, `use_cpu: true` and MULTI_CPU configs through its single-process
    launcher, whatever `num_processes` says: training would silently run on one process.
    """
    parent = _parent_command(os.getppid() if ppid is None else ppid)
    if parent is None:
        return
    wanted = requested_processes(*parent)
    if wanted is not None and wanted > 1:
        raise UsageError(
            f"`accelerate launch` was asked for {wanted} processes but started only this one (it runs --cpu, "
            "use_cpu: true and MULTI_CPU configs as a single process); on CPU use "
            f"`{CPU_DDP_HINT}` (or --multi_gpu --num_processes {wanted}, without --cpu)")

