"""Render and submit the Slurm batch scripts in slurm/ for a recipe.

    python -m launcher.slurm render --recipe recipes/mnist1d.yaml --nodes 2 --gpus_per_node 8 \\
        --time 04:00:00 --partition gpu -- --optim.lr=0.005 --train.num_epochs=90
    python -m launcher.slurm submit ... (the same options; renders, then runs sbatch)

`render` writes `<run dir>/slurm/job.sbatch` (default run dir `runs/<recipe name>-<timestamp>`) and
prints its path; `--dry_run` prints the script instead and writes nothing. `submit` renders, runs
`sbatch` and prints the job id and the log path. The run directory must be new (or empty): an
existing run is never overwritten.

Everything after a bare `--` is a training override (`--section.key=value` or `--section.key
value`) handed to `launcher.train` unchanged. This tool parses its own command line with argparse
rather than python-fire, because fire claims a bare `--` for its own flags; values are read the
way fire reads them in the trainer, and the recipe plus overrides must load
(`launcher.config.load_config`) before anything is written.

Every value that reaches the script is validated (time format, positive counts, names made of
letters, digits and `._-`) and shell-quoted, so a job name or override containing `$(...)`,
backticks, `;` or newlines is either refused or passed on as plain text; it never runs.

Inside the job, each srun task runs `python -m launcher.slurm launch <accelerate launch args>`:
accelerate's own launcher, run in-process, that ignores the preemption signal (the training
processes handle it) and exits with the training processes' status, so 124 (checkpoint saved
after a preemption signal) reaches the batch script, which then requeues the job. See the header
of slurm/single_node.sbatch for the whole signal path.

User errors print one line and exit with status 2.

The pieces: `launcher.slurm_spec` checks the options and builds a `JobSpec`, `launcher.slurm_script`
fills in the templates, writes and submits them, `launcher.slurm_launch` runs inside the job. This
module is the command line; it imports neither torch nor accelerate.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from typing import Any

from launcher.errors import UsageError, exit_with
from launcher.preemption import PREEMPTED_EXIT
from launcher.slurm_launch import PREEMPT_SIGNAL_ENV, launch
from launcher.slurm_script import (
    REPO_ROOT,
    TEMPLATE_DIR,
    _q,
    _sbatch_value,
    accelerate_args,
    common_values,
    render,
    submit,
    write,
)
from launcher.slurm_spec import (
    EARLY_WARNING_SIGNALS,
    SLURM_TICK_S,
    JobSpec,
    _parse_value,
    _safe_stem,
    _sbatch_path,
    make_spec,
    parse_overrides,
    parse_time,
    split_flags,
)

__all__ = ["EARLY_WARNING_SIGNALS", "PREEMPTED_EXIT", "PREEMPT_SIGNAL_ENV", "REPO_ROOT", "SLURM_TICK_S",
           "TEMPLATE_DIR", "JobSpec", "_parse_value", "_q", "_safe_stem", "_sbatch_path", "_sbatch_value",
           "accelerate_args", "cli", "common_values", "launch", "main", "make_spec", "parse_overrides", "parse_time",
           "render", "split_flags", "submit", "write"]


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)  # --node is a typo, not --nodes
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> Any:  # one line and exit 2, like every other user error
        hint = self._near_miss(message)
        raise UsageError(f"{message}{hint} (see {self.prog.split(' render')[0].split(' submit')[0]} "
                         f"{{render,submit}} --help)")

    def _near_miss(self, message: str) -> str:
        import difflib

        match = re.search(r"unrecognized arguments: (\S+)", message)
        if not match:
            return ""
        flag = match.group(1).split("=", 1)[0].replace("-", "_").lstrip("_")
        options = [o for a in self._actions for o in a.option_strings if o.startswith("--")]
        for action in self._actions:
            for parser in (getattr(action, "choices", None) or {}).values():
                if isinstance(parser, argparse.ArgumentParser):
                    options += [o for a in parser._actions for o in a.option_strings if o.startswith("--")]
        if "." in flag:
            return "; training overrides go after a bare --, e.g. -- --optim.lr=0.005"
        close = difflib.get_close_matches(f"--{flag}", sorted(set(options)), n=1, cutoff=0.6)
        return f"; did you mean {close[0]}?" if close else ""


PROG = "python -m launcher.slurm"


_EPILOG = """\
Training overrides go after a bare `--` and are handed to launcher.train unchanged:
  python -m launcher.slurm submit --recipe recipes/mnist1d.yaml --nodes 1 --gpus_per_node 0 \\
      --num_processes 2 --time 00:30:00 -- --optim.lr=0.005 --train.num_epochs=2
They are read the way the trainer's fire reads them and checked against the recipe first."""


def _parser(prog: str = PROG) -> argparse.ArgumentParser:
    parser = _Parser(prog=prog, description="Render or submit a Slurm job for a recipe.",
                     epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", metavar="{render,submit}", parser_class=_Parser)
    for name, help_text in (("render", "write <run dir>/slurm/job.sbatch and print its path"),
                            ("submit", "render, run sbatch, print the job id and the log path")):
        p = commands.add_parser(name, help=help_text, description=help_text, epilog=_EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--recipe", required=True, help="recipe YAML (copied into the run directory)")
        p.add_argument("--nodes", type=int, required=True, help="nodes (>1 uses slurm/multi_node.sbatch)")
        p.add_argument("--gpus_per_node", type=int, required=True,
                       help="GPUs per node, one training process each; 0 = CPU only")
        p.add_argument("--time", required=True, help="time limit HH:MM:SS or D-HH:MM:SS")
        p.add_argument("--partition", help="Slurm partition (or comma-separated list)")
        p.add_argument("--account", help="Slurm account")
        p.add_argument("--job_name", help="job name; default the recipe name")
        p.add_argument("--accelerate_config", help="accelerate config YAML, e.g. accelerate_configs/cpu_ddp.yaml; "
                       "default: plain DDP flags")
        p.add_argument("--output_dir", help="run directory (must be new or empty); default runs/<recipe>-<time>")
        p.add_argument("--cpus_per_task", type=int,
                       help="CPUs per node for the task; default processes x (1 + data.num_workers)")
        p.add_argument("--num_processes", type=int, help="CPU jobs only: training processes per node (default 1)")
        p.add_argument("--max_requeues", type=int, default=10,
                       help="requeue after a preemption at most this many times (default 10)")
        p.add_argument("--signal_seconds", type=int,
                       help="send the checkpoint signal this long before the time limit "
                       "(default min(300, (time - 30 s) / 2))")
        p.add_argument("--dry_run", action="store_true", help="print the script; write and submit nothing")
    return parser


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    """The command line; returns the exit status (UsageError escapes to the caller)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["launch"]:
        return launch(argv[1:])
    from launcher.output import install_warnings

    install_warnings()
    own, overrides = (argv[: argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = _parser(prog)
    args = parser.parse_args(own)
    if args.command is None:
        parser.print_help()
        return 0
    spec = make_spec(args.recipe, args.nodes, args.gpus_per_node, args.time, partition=args.partition,
                     account=args.account, job_name=args.job_name, accelerate_config=args.accelerate_config,
                     output_dir=args.output_dir, cpus_per_task=args.cpus_per_task,
                     num_processes=args.num_processes, max_requeues=args.max_requeues,
                     signal_seconds=args.signal_seconds, overrides=overrides)
    script = render(spec)
    if args.dry_run:
        sys.stdout.write(script)
        return 0
    created = not spec.run_dir.exists()
    path = write(spec, script)
    if args.command == "render":
        print(path)
        return 0
    try:
        job_id = submit(spec, path)
    except UsageError:
        # Nothing was submitted: leave no trace of this attempt.
        shutil.rmtree(spec.run_dir if created else path.parent, ignore_errors=True)
        raise
    print(f"job {job_id}")
    print(f"log {spec.log_path(job_id)}")
    return 0


def cli() -> None:
    exit_with(main)


if __name__ == "__main__":
    cli()
