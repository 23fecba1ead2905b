"""A sweep as one Slurm job array (`--array=0-N%K`): one point x seed a task, each task a normal
launcher job (slurm/array.sbatch: preemption signal, checkpoint, requeue, `--resume auto`).

The options are those of `launcher.slurm` (validated by `launcher.slurm.make_spec`), for one node
per task. Only runs that are not completed become tasks, so the same command submitted again
after an array ended (or was cancelled) trains what is left; while tasks of an earlier array are
still queued or running, it refuses. When every run is completed the sweep writes its report.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from launcher.errors import UsageError
from launcher.runs import completed

JOBS_FILE = "jobs.txt"


def _active(out: Path) -> list[str]:
    """Array jobs of this sweep that Slurm still holds (pending or running)."""
    path = out / "slurm" / JOBS_FILE
    squeue = shutil.which("squeue")
    if not path.is_file() or squeue is None:
        return []
    active = []
    for job_id in path.read_text().split():
        proc = subprocess.run([squeue, "-h", "-j", job_id, "-o", "%i"], capture_output=True, text=True)
        if proc.returncode == 0 and proc.stdout.strip():
            active.append(job_id)
    return active


def render_array(spec: Any, out: Path, tasks: list[tuple[Path, list[str]]], parallel: int, script_path: Path) -> str:
    from launcher.slurm import TEMPLATE_DIR, _q, _sbatch_path, accelerate_args, common_values

    log_pattern = _sbatch_path("--output_dir", out.resolve() / "slurm") / "%x-%A_%a.out"
    cases = "\n".join(f"  {i})\n    RUN_DIR={_q(run_dir)}\n    POINT_ARGS=({' '.join(_q(a) for a in args)})\n    ;;"
                      for i, (run_dir, args) in enumerate(tasks))
    values = {
        **common_values(spec, log_pattern),
        "num_tasks": str(len(tasks)),
        "parallel": str(parallel),
        "array": f"0-{len(tasks) - 1}%{parallel}",
        "device": f"{spec.gpus_per_node} GPU(s)" if spec.gpus_per_node else "CPU only",
        "script_path_text": str(script_path),
        "accelerate_args": " ".join(_q(a) for a in accelerate_args(spec)),
        "recipe": _q(out.resolve() / "slurm" / spec.recipe.name),
        "cases": cases,
    }
    lines = []
    for line in (TEMPLATE_DIR / "array.sbatch").read_text().splitlines():
        stripped = line.strip()
        if re.fullmatch(r"\{\{(\w+)\}\}", stripped) and not values[stripped[2:-2]]:
            continue
        lines.append(re.sub(r"\{\{(\w+)\}\}", lambda m: values[m.group(1)], line))
    return "\n".join(lines) + "\n"


def submit_array(args: Any, out: Path, tasks: list[tuple[Path, list[str]]], override_tokens: list[str],
                 again: str, state: dict[str, Any]) -> bool:
    """Submit the runs that are not completed as one array; True when none is left (report now)."""
    from launcher import slurm
    from launcher.sweep import _write_state

    if args.time is None:
        raise UsageError("--slurm needs --time HH:MM:SS, the time limit of each task (e.g. --time 01:00:00)")
    if args.nodes != 1:
        raise UsageError(f"--nodes {args.nodes}: a sweep runs each point on one node (--nodes 1); for multi-node "
                         "training submit single runs with python -m launcher.slurm")
    if args.num_processes is not None and args.gpus_per_node:
        raise UsageError("--num_processes is for CPU tasks (--gpus_per_node 0); with GPUs there is one process per GPU")
    job_name = args.job_name or slurm._safe_stem(out.resolve().name)
    spec = slurm.make_spec(args.recipe, 1, args.gpus_per_node, args.time, partition=args.partition,
                           account=args.account, job_name=job_name, accelerate_config=args.accelerate_config,
                           output_dir=str(out / "slurm" / ".never-written"), cpus_per_task=args.cpus_per_task,
                           num_processes=args.num_processes, max_requeues=args.max_requeues,
                           signal_seconds=args.signal_seconds, overrides=override_tokens)
    pending = [(run_dir, a) for run_dir, a in tasks if not completed(run_dir)]
    if not pending:
        print(f"sweep: all {len(tasks)} runs in {out} are completed; nothing to submit", flush=True)
        return True
    active = _active(out)
    if active:
        raise UsageError(f"array job {', '.join(active)} of this sweep is still queued or running (squeue -j "
                         f"{active[0]}); wait for it to end or scancel it, then run the same command again")
    script_path = out.resolve() / "slurm" / f"array-{time.strftime('%Y%m%d-%H%M%S')}.sbatch"
    script = render_array(spec, out, pending, args.parallel, script_path)
    if args.dry_run:
        sys.stdout.write(script)
        return False
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise UsageError("sbatch not found on PATH; run this on a Slurm login node (or use --dry_run to see the script)")
    created = [p for p in (out, out / "slurm") if not p.exists()]
    (out / "slurm").mkdir(parents=True, exist_ok=True)
    recipe_copy = out / "slurm" / spec.recipe.name
    if not recipe_copy.exists():
        shutil.copyfile(spec.recipe, recipe_copy)  # every task, and every later resubmission, trains this copy
        created.append(recipe_copy)
    script_path.write_text(script)
    proc = subprocess.run([sbatch, "--parsable", str(script_path)], capture_output=True, text=True, cwd=spec.workdir)
    if proc.returncode != 0:  # nothing was submitted: leave no trace of this attempt
        script_path.unlink()
        if created and created[0].is_dir():
            shutil.rmtree(created[0])
        elif created:
            created[0].unlink()
        message = " ".join((proc.stderr or proc.stdout).split()) or f"exit status {proc.returncode}"
        raise UsageError(f"sbatch refused the array: {message}")
    _write_state(out, state)
    job_id = proc.stdout.strip().split(";")[0]
    with open(out / "slurm" / JOBS_FILE, "a") as f:
        f.write(job_id + "\n")
    print(f"sweep: submitted array job {job_id}: {len(pending)} task(s) of {len(tasks)} runs, at most "
          f"{args.parallel} at once", flush=True)
    print(f"job {job_id}")
    print(f"log {out.resolve() / 'slurm'}/{job_name}-{job_id}_<task>.out")
    print(f"when it has ended, run the same command again to write sweep.md/json/png: {again}", flush=True)
    return False
