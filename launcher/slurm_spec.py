"""The options of `python -m launcher.slurm`, checked: a `JobSpec` with every value a batch script needs.

Every value that reaches a script is validated here (time format, positive counts, names made of
letters, digits and `._-`, paths Slurm directives can carry), and the recipe plus the training
overrides must load (`launcher.config.load_config`) before anything is written. Overrides are read
the way fire reads them in the trainer (`split_flags`, `parse_overrides`).
"""

from __future__ import annotations

import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher.errors import UsageError

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

