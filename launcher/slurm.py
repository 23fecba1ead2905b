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
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher.errors import UsageError, exit_with

REPO_ROOT = Path(__file__).resolve().parent.parent
TEMPLATE_DIR = REPO_ROOT / "slurm"
PREEMPTED_EXIT = 124  # the trainer's exit status after checkpointing on a preemption signal
PREEMPT_SIGNAL_ENV = "LAUNCHER_PREEMPT_SIGNAL"
# Signals the template may use as the early warning. TERM/INT/HUP/QUIT are taken: torchrun's agent
# handles them itself (forwards, then SIGKILLs after 30 s), and Slurm uses TERM for the final kill.
EARLY_WARNING_SIGNALS = ("SIGUSR1", "SIGUSR2")
# slurmctld checks time limits every 30 s and sends the --signal once remaining time <= N + 30 s. A
# signal that falls before the srun step has started is lost (it goes to steps only, and only once).
SLURM_TICK_S = 30

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_NAME_LIST = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(,[A-Za-z0-9][A-Za-z0-9._-]*)*")
_TIME = re.compile(r"(?:(\d+)-)?(\d+):([0-5]\d):([0-5]\d)")
_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
# Characters that would break an `#SBATCH` line (sbatch reads quotes, backslashes and `#` there)
# or a log file name (Slurm expands `%` patterns).
_SBATCH_UNSAFE = set('"\\#%')


@dataclass(frozen=True)
class JobSpec:
    """Everything a template needs, validated. Paths are absolute."""

    recipe: Path
    run_dir: Path
    job_name: str
    nodes: int
    gpus_per_node: int
    processes_per_node: int
    cpus_per_task: int
    time: str
    partition: str | None
    account: str | None
    accelerate_config: Path | None
    max_requeues: int
    signal_seconds: int
    signal: str
    """Python name of the preemption signal, e.g. SIGUSR1 (the recipe's checkpoint.signal)."""
    overrides: tuple[str, ...]
    """Training overrides, each `--key=value`."""
    python: str
    workdir: Path

    @property
    def script_path(self) -> Path:
        return self.run_dir / "slurm" / "job.sbatch"

    @property
    def recipe_copy(self) -> Path:
        """The recipe as it was at render time: every (re)start of the job trains exactly this."""
        return self.run_dir / "slurm" / self.recipe.name

    @property
    def log_pattern(self) -> Path:
        return self.run_dir / "slurm" / "%x-%j.out"

    def log_path(self, job_id: str) -> Path:
        return self.run_dir / "slurm" / f"{self.job_name}-{job_id}.out"


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


def parse_time(value: str) -> int:
    """Seconds in a Slurm time limit written HH:MM:SS or D-HH:MM:SS."""
    match = _TIME.fullmatch(value.strip())
    if not match:
        raise UsageError(f"--time {value!r}: write HH:MM:SS or D-HH:MM:SS, e.g. --time 04:00:00")
    days, hours, minutes, seconds = (int(g) if g else 0 for g in match.groups())
    total = ((days * 24 + hours) * 60 + minutes) * 60 + seconds
    if total <= 0:
        raise UsageError(f"--time {value!r}: the time limit must be longer than zero")
    return total


def _positive(name: str, value: int, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UsageError(f"--{name} must be an integer >= {minimum}; got {value!r}")
    return value


def _name(option: str, value: str, pattern: re.Pattern[str] = _NAME) -> str:
    if not pattern.fullmatch(value):
        raise UsageError(f"--{option} {value!r}: use only letters, digits and . _ - "
                         f"(starting with a letter or digit)")
    return value


def _sbatch_path(option: str, path: Path) -> Path:
    text = str(path)
    bad = sorted({c for c in text if c in _SBATCH_UNSAFE or ord(c) < 32 or ord(c) == 127})
    if bad:
        shown = " ".join(repr(c) for c in bad)
        raise UsageError(f"{option} {text!r} contains {shown}, which Slurm directives cannot carry; "
                         f"choose a path without them")
    return path


def _parse_value(text: str) -> Any:
    """A command-line value as the trainer's fire will see it (`[0.9,0.95]` -> list, `0.005` -> float)."""
    try:
        from fire.parser import DefaultParseValue
    except ImportError:  # the config layer coerces strings itself; only lists need fire's reading
        return text
    return DefaultParseValue(text)


def parse_overrides(tokens: list[str]) -> dict[str, Any]:
    """`--a.b=v` / `--a.b v` tokens -> {'a.b': value}, values read the way fire reads them."""
    overrides: dict[str, Any] = {}
    for key, value, token in split_flags(tokens):
        if key is None:
            raise UsageError(f"training override {token!r}: write --section.key=value, e.g. --optim.lr=0.005")
        if value is None:
            raise UsageError(f"training override {token!r} has no value; write {token}=VALUE")
        if not _KEY.fullmatch(key):
            raise UsageError(f"training override key {key!r}: write --section.key=value, e.g. --optim.lr=0.005")
        overrides[key] = _parse_value(value)
    return overrides


def split_flags(tokens: list[str]) -> list[tuple[str | None, str | None, str]]:
    """`--a.b=v` / `--a.b v` / `--flag` tokens -> (key with `-` as `_`, value or None, the flag token);
    a word that is not a flag comes back as (None, None, word). Callers say what each case means."""
    out: list[tuple[str | None, str | None, str]] = []
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--") or token == "--":
            out.append((None, None, token))
            i += 1
            continue
        key, eq, value = token[2:].partition("=")
        if not eq:
            has_value = i + 1 < len(tokens) and not tokens[i + 1].startswith("--")
            value = tokens[i + 1] if has_value else None
            i += has_value
        out.append((key.replace("-", "_"), value, token))
        i += 1
    return out


def _override_tokens(tokens: list[str]) -> tuple[str, ...]:
    """The overrides normalised to `--key=value` tokens with the user's text unchanged."""
    out = []
    i = 0
    while i < len(tokens):
        key, eq, value = tokens[i][2:].partition("=")
        if not eq:
            value = tokens[i + 1]
            i += 1
        out.append(f"--{key.replace('-', '_')}={value}")
        i += 1
    return tuple(out)


def _safe_stem(text: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "run"
    return stem[:64]


def make_spec(recipe: str, nodes: int, gpus_per_node: int, time_limit: str, *, partition: str | None = None,
              account: str | None = None, job_name: str | None = None, accelerate_config: str | None = None,
              output_dir: str | None = None, cpus_per_task: int | None = None, num_processes: int | None = None,
              max_requeues: int = 10, signal_seconds: int | None = None,
              overrides: list[str] | None = None) -> JobSpec:
    """Validate the options, load the recipe with the overrides, and fix every path."""
    from launcher.config import load_config

    tokens = list(overrides or [])
    cfg = load_config(recipe, parse_overrides(tokens))
    override_tokens = _override_tokens(tokens)

    _positive("nodes", nodes)
    _positive("gpus_per_node", gpus_per_node, minimum=0)
    time_s = parse_time(time_limit)
    if gpus_per_node > 0:
        if num_processes is not None:
            raise UsageError("--num_processes is for CPU jobs (--gpus_per_node 0); with GPUs there is one "
                             "process per GPU")
        processes_per_node = gpus_per_node
    else:
        processes_per_node = _positive("num_processes", 1 if num_processes is None else num_processes)
    if cpus_per_task is None:
        cpus_per_task = processes_per_node * (1 + cfg.data.num_workers)  # each process + its loader workers
    _positive("cpus_per_task", cpus_per_task)
    _positive("max_requeues", max_requeues, minimum=0)
    if signal_seconds is None:
        signal_seconds = max(1, min(300, (time_s - SLURM_TICK_S) // 2))
    _positive("signal_seconds", signal_seconds)
    if signal_seconds + SLURM_TICK_S >= time_s or signal_seconds > 65535:
        raise UsageError(f"--signal_seconds {signal_seconds} with --time {time_limit}: Slurm sends the checkpoint "
                         f"signal up to {SLURM_TICK_S} s earlier than asked, so signal_seconds + {SLURM_TICK_S} must "
                         f"be shorter than the time limit (and signal_seconds at most 65535)")
    if partition is not None:
        _name("partition", partition, _NAME_LIST)
    if account is not None:
        _name("account", account)

    signal_name = cfg.checkpoint.signal
    if signal_name not in EARLY_WARNING_SIGNALS:
        raise UsageError(f"checkpoint.signal={signal_name} cannot be the Slurm early-warning signal (torchrun and "
                         f"Slurm use TERM/INT/HUP/QUIT themselves); set --checkpoint.signal=SIGUSR1 or SIGUSR2")
    if not cfg.checkpoint.enabled:
        print("warning: checkpoint.enabled is false, so a preempted or timed-out job restarts from scratch",
              file=sys.stderr)

    job_name = _name("job_name", job_name) if job_name is not None else _safe_stem(cfg.name or Path(recipe).stem)

    config_path = None
    if accelerate_config is not None:
        config_path = Path(accelerate_config).resolve()
        if not config_path.is_file():
            raise UsageError(f"--accelerate_config {accelerate_config!r} not found; see accelerate_configs/")
        _sbatch_path("--accelerate_config", config_path)

    if output_dir is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        default = run_dir = Path("runs", f"{_safe_stem(cfg.name or Path(recipe).stem)}-{stamp}").resolve()
        suffix = 2
        while run_dir.exists():  # two renders within one second
            run_dir = default.with_name(f"{default.name}-{suffix}")
            suffix += 1
    else:
        run_dir = Path(output_dir).resolve()
    _sbatch_path("--output_dir", run_dir)
    from launcher.output import check_dir

    check_dir(str(run_dir), "--output_dir")
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise UsageError(f"run directory {str(run_dir)!r} already exists and is not empty; choose another "
                         f"--output_dir (an existing run is never overwritten)")
    workdir = _sbatch_path("the current directory", Path.cwd().resolve())

    return JobSpec(
        recipe=Path(recipe).resolve(), run_dir=run_dir, job_name=job_name, nodes=nodes,
        gpus_per_node=gpus_per_node, processes_per_node=processes_per_node, cpus_per_task=cpus_per_task,
        time=time_limit.strip(), partition=partition, account=account, accelerate_config=config_path,
        max_requeues=max_requeues, signal_seconds=signal_seconds, signal=signal_name,
        overrides=override_tokens, python=sys.executable, workdir=workdir)


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------


def _q(value: Any) -> str:
    return shlex.quote(str(value))


def _sbatch_value(path: Path) -> str:
    """A path for an #SBATCH line: sbatch splits on spaces unless double-quoted."""
    text = str(path)
    return f'"{text}"' if any(c.isspace() for c in text) else text


def accelerate_args(spec: JobSpec) -> list[str]:
    """`accelerate launch` options fixed at render time. The counts (machines, processes, rank, main
    address, --multi_gpu) are computed in the job from its allocation: slurm/launch_counts.sh."""
    if spec.accelerate_config is not None:
        # The config decides the distributed type (DDP, FSDP, DeepSpeed); passing --multi_gpu would override it.
        return ["--config_file", str(spec.accelerate_config)]
    return ["--mixed_precision", "no", "--dynamo_backend", "no"]


def launch_counts(spec: JobSpec) -> str:
    """slurm/launch_counts.sh filled in: the bash block that sets NODES, PROCS_PER_NODE, TOTAL_PROCESSES,
    CPUS_PER_TASK and ACCELERATE_ARGS from the allocation the job got."""
    device = f"{spec.gpus_per_node} GPU(s)" if spec.gpus_per_node else f"{spec.processes_per_node} CPU process(es)"
    values = {
        "requested": f"{spec.nodes} node(s) x {device}, {spec.cpus_per_task} CPU(s) per task",
        "gpus_per_node": str(spec.gpus_per_node),
        "processes_per_node": str(spec.processes_per_node),
        "cpus_per_task": str(spec.cpus_per_task),
        "accelerate_args": " ".join(_q(a) for a in accelerate_args(spec)),
        "multi_gpu": "no" if spec.accelerate_config is not None else "yes",
    }
    text = (TEMPLATE_DIR / "launch_counts.sh").read_text().rstrip("\n")
    return re.sub(r"\{\{(\w+)\}\}", lambda m: values[m.group(1)], text)


def common_values(spec: JobSpec, log_pattern) -> dict[str, str]:
    """Template values every batch script shares (single node, multi node, the sweep's job array)."""
    return {
        "job_name": spec.job_name,
        "processes_per_node": str(spec.processes_per_node),
        "cpus_per_task": str(spec.cpus_per_task),
        "gres_line": f"#SBATCH --gres=gpu:{spec.gpus_per_node}" if spec.gpus_per_node else "",
        "time": spec.time,
        "partition_line": f"#SBATCH --partition={spec.partition}" if spec.partition else "",
        "account_line": f"#SBATCH --account={spec.account}" if spec.account else "",
        "workdir": _sbatch_value(spec.workdir),
        "log_pattern": _sbatch_value(log_pattern),
        "signal": spec.signal.removeprefix("SIG"),
        "signal_name": spec.signal,
        "signal_seconds": str(spec.signal_seconds),
        "max_requeues": str(spec.max_requeues),
        "python": _q(spec.python),
        "pythonpath": _q(REPO_ROOT),
        "cpu_env_line": "export ACCELERATE_USE_CPU=true" if spec.gpus_per_node == 0 else "",
        "launch_counts": launch_counts(spec),
    }


def render(spec: JobSpec) -> str:
    """The batch script for `spec` (single_node.sbatch or multi_node.sbatch)."""
    template_name = "single_node.sbatch" if spec.nodes == 1 else "multi_node.sbatch"
    template = (TEMPLATE_DIR / template_name).read_text()
    device = f"{spec.gpus_per_node} GPU(s) per node" if spec.gpus_per_node else "CPU only"
    values = {
        **common_values(spec, spec.log_pattern),
        "nodes": str(spec.nodes),
        "total_processes": str(spec.nodes * spec.processes_per_node),
        "device": device,
        "script_path": _q(spec.script_path),
        "script_path_text": str(spec.script_path),
        "run_dir": _q(spec.run_dir),
        "accelerate_args": " ".join(_q(a) for a in accelerate_args(spec)),
        "recipe": _q(spec.recipe_copy),
        "overrides": "\n  ".join(_q(o) for o in spec.overrides),
    }

    def fill(match: re.Match[str]) -> str:
        return values[match.group(1)]

    lines = []
    for line in template.splitlines():
        stripped = line.strip()
        if re.fullmatch(r"\{\{(\w+)\}\}", stripped) and not values[stripped[2:-2]]:
            continue  # an optional line (#SBATCH --partition, ...) with nothing to say
        lines.append(re.sub(r"\{\{(\w+)\}\}", fill, line))
    return "\n".join(lines) + "\n"


def write(spec: JobSpec, script: str) -> Path:
    """Create the run directory's slurm/ folder with the script and the recipe copy."""
    slurm_dir = spec.script_path.parent
    created = _first_missing(slurm_dir)
    try:
        slurm_dir.mkdir(parents=True, exist_ok=True)
        if spec.script_path.exists():
            raise UsageError(f"{spec.script_path} already exists; choose another --output_dir")
        shutil.copyfile(spec.recipe, spec.recipe_copy)
        spec.script_path.write_text(script)
        spec.script_path.chmod(0o755)
    except OSError as err:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise UsageError(f"--output_dir {str(spec.run_dir)!r}: cannot write {err.filename or slurm_dir} "
                         f"({err.strerror}); choose another --output_dir") from None
    return spec.script_path


def _first_missing(path: Path) -> Path | None:
    """The topmost directory that creating `path` creates (removed again if writing fails)."""
    missing = None
    while not path.exists() and path.parent != path:
        missing, path = path, path.parent
    return missing


def submit(spec: JobSpec, script_path: Path) -> str:
    """Run sbatch on the rendered script; returns the job id."""
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise UsageError("sbatch not found on PATH; run this on a Slurm login node, or use `render` and "
                         "submit the script there")
    proc = subprocess.run([sbatch, "--parsable", str(script_path)], capture_output=True, text=True,
                          cwd=spec.workdir)
    if proc.returncode != 0:
        message = " ".join((proc.stderr or proc.stdout).split()) or f"exit status {proc.returncode}"
        raise UsageError(f"sbatch refused the job: {message}")
    return proc.stdout.strip().split(";")[0]


# ---------------------------------------------------------------------------------------------
# Inside the job: accelerate launch that keeps the training exit status
# ---------------------------------------------------------------------------------------------


def _status_from_code(code: int) -> int:
    return 128 - code if code < 0 else code  # killed by signal N -> 128 + N, as shells report it


def _group_status(codes: list[int]) -> int:
    """One exit status for the failed processes of a torch elastic group.

    Ranks leave at slightly different moments, and the agent SIGTERMs (later SIGKILLs) whoever is
    still running once the first one exits. The trainer exits 124 only after the checkpoint's final
    barrier, so one 124 means every rank got past it: 124 plus processes stopped by the agent is
    still a clean preemption. Any other failure wins.
    """
    stopped_by_agent = (-signal.SIGTERM, -signal.SIGKILL)
    if PREEMPTED_EXIT in codes and all(c == PREEMPTED_EXIT or c in stopped_by_agent for c in codes):
        return PREEMPTED_EXIT
    real = [c for c in codes if c != PREEMPTED_EXIT and c not in stopped_by_agent]
    return _status_from_code((real or codes)[0])


def launch(argv: list[str]) -> int:
    """Run `accelerate launch <argv>` in this process; return the training processes' exit status.

    `accelerate launch` reports any failed training process as status 1, which would hide the 124
    of a preempted run. Here the launcher's own exceptions are caught instead (see `_group_status`
    for several processes). The preemption signal is ignored in this process (and, until the
    trainer installs its handler, in the training processes it starts), so Slurm's signal to the
    whole step does not kill the launcher while the trainers checkpoint.
    """
    signal_name = os.environ.get(PREEMPT_SIGNAL_ENV, "SIGUSR1")
    if signal_name not in EARLY_WARNING_SIGNALS:
        raise UsageError(f"{PREEMPT_SIGNAL_ENV}={signal_name!r}: expected one of {', '.join(EARLY_WARNING_SIGNALS)}")
    signal.signal(getattr(signal, signal_name), signal.SIG_IGN)

    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = launch_command_parser().parse_args(argv)
    try:
        launch_command(args)
    except subprocess.CalledProcessError as err:  # one process (accelerate's simple launcher)
        status = _status_from_code(err.returncode)
    except ChildFailedError as err:  # several processes (torch elastic)
        status = _group_status([failure.exitcode for failure in err.failures.values()])
    except SignalException as err:  # TERM/INT/HUP/QUIT: the agent stopped the workers
        status = 128 + int(err.sigval)
    else:
        status = 0
    if status == PREEMPTED_EXIT:
        print(f"launcher.slurm: training stopped on a preemption signal with a checkpoint saved (exit {status})",
              file=sys.stderr, flush=True)
    elif status:
        print(f"launcher.slurm: training failed (exit {status})", file=sys.stderr, flush=True)
    return status


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
