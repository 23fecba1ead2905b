"""Batch scripts from the templates in slurm/: fill in a `JobSpec`, write it into the run directory, sbatch it."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

from launcher.errors import UsageError
from launcher.slurm_spec import JobSpec

REPO_ROOT = Path(__file__).resolve().parent.parent
TEMPLATE_DIR = REPO_ROOT / "slurm"


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

