"""The rendered templates on a real one-node Slurm cluster (started by the fixture, see
tests/slurm_cluster.py): a training job completes, and the preemption signal path works end to
end (signal -> training processes -> exit 124 -> requeue -> the next start sees SLURM_RESTART_COUNT=1)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import slurm_cluster

from launcher import slurm

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parent.parent
RECIPE = str(REPO / "recipes" / "mnist1d.yaml")
CPU_CONFIG = str(REPO / "accelerate_configs" / "cpu_ddp.yaml")




@pytest.fixture
def slurm_env(cluster, monkeypatch, tmp_path) -> slurm_cluster.Cluster:
    monkeypatch.setenv("SLURM_CONF", str(cluster.conf))
    monkeypatch.chdir(REPO)
    return cluster


def render(argv: list[str]) -> Path:
    assert slurm.main(["render", *argv]) == 0
    return Path(argv[argv.index("--output_dir") + 1]) / "slurm" / "job.sbatch"


def job_info(cluster: slurm_cluster.Cluster, job_id: str) -> dict[str, str]:
    out = cluster.run("scontrol", "show", "job", "-o", job_id).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def wait_for_end(cluster: slurm_cluster.Cluster, job_id: str, log: Path, timeout: float) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = job_info(cluster, job_id)
        if info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return info
        time.sleep(0.5)
    cluster.run("scancel", job_id, check=False)
    text = log.read_text() if log.exists() else "(no log)"
    raise AssertionError(f"job {job_id} still {job_info(cluster, job_id).get('JobState')} after {timeout} s:\n{text}")


def wait_for_files(pattern: str, where: Path, count: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while len(list(where.glob(pattern))) < count:
        assert time.monotonic() < deadline, f"no {count} x {pattern} in {where} after {timeout} s"
        time.sleep(0.1)


def test_training_job_completes(slurm_env, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert slurm.main(["submit", "--recipe", RECIPE, "--nodes", "1", "--gpus_per_node", "0", "--num_processes", "2",
                       "--time", "00:05:00", "--accelerate_config", CPU_CONFIG, "--output_dir", str(run_dir),
                       "--", "--train.num_epochs=2"]) == 0
    out = capsys.readouterr().out
    job_id = re.search(r"^job (\d+)$", out, re.M).group(1)
    log = Path(re.search(r"^log (.+)$", out, re.M).group(1))
    assert log == run_dir / "slurm" / f"mnist1d-{job_id}.out"

    info = wait_for_end(slurm_env, job_id, log, timeout=90)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED", text
    assert "training exited with status 0" in text
    plan = json.loads((run_dir / "plan.json").read_text())
    assert plan["num_processes"] == 2  # one run of two processes, not two independent runs
    assert json.loads((run_dir / "summary.json").read_text())["final_epoch"] == 2
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert max(row.get("epoch", 0) for row in rows) == 2


# A stand-in for launcher.train that keeps the trainer's contract on the preemption signal
# (checkpoint, exit 124) without training: each rank notes what it saw in the run directory.
STANDIN = """\
import os, signal, sys, time
args = sys.argv[1:]
run_dir = args[args.index("--output_dir") + 1]
assert args[args.index("--resume") + 1] == "auto"
rank = os.environ.get("RANK", "0")
start = os.environ.get("SLURM_RESTART_COUNT", "0")
got = []
signal.signal(signal.SIGUSR1, lambda *_: got.append(1))
open(os.path.join(run_dir, f"ready-{start}-{rank}"), "w").close()
if start != "0":
    sys.exit(0)  # the requeued start: "resume" and finish
deadline = time.time() + 50
while not got and time.time() < deadline:
    time.sleep(0.05)
if not got:
    sys.exit(3)
open(os.path.join(run_dir, f"signalled-{rank}"), "w").close()
sys.exit(124)  # checkpoint saved
"""


def render_with_standin(tmp_path: Path, argv: list[str]) -> tuple[Path, Path]:
    """Render a CPU job, then point its training command at the stand-in (everything else unchanged)."""
    standin = tmp_path / "standin.py"
    standin.write_text(STANDIN)
    run_dir = tmp_path / "run"
    script_path = render([*argv, "--output_dir", str(run_dir)])
    text = script_path.read_text()
    assert text.count(" -m launcher.train ") == 1
    script_path.write_text(text.replace(" -m launcher.train ", f" {standin} "))
    return script_path, run_dir


def submit_standin(cluster: slurm_cluster.Cluster, tmp_path: Path, *options: str) -> tuple[str, Path, Path]:
    """Submit a one-node CPU job of the stand-in with these options: (job id, run directory, job log)."""
    script_path, run_dir = render_with_standin(tmp_path, [
        "--recipe", RECIPE, "--nodes", "1", "--gpus_per_node", "0", *options])
    job_id = cluster.run("sbatch", "--parsable", str(script_path)).stdout.strip().split(";")[0]
    return job_id, run_dir, run_dir / "slurm" / f"mnist1d-{job_id}.out"


def signal_when_ready(cluster: slurm_cluster.Cluster, job_id: str, run_dir: Path, ready: str, count: int) -> None:
    """What --signal=USR1@N does at the deadline: signal every process of the job's steps, not the batch
    shell; sent once `count` processes wrote their `ready` file."""
    wait_for_files(ready, run_dir, count, timeout=40)
    cluster.run("scancel", "--signal=USR1", job_id)


def test_preemption_signal_reaches_training_and_the_job_requeues(slurm_env, tmp_path):
    job_id, run_dir, log = submit_standin(slurm_env, tmp_path, "--num_processes", "2", "--time", "00:05:00")
    signal_when_ready(slurm_env, job_id, run_dir, "ready-0-*", 2)

    info = wait_for_end(slurm_env, job_id, log, timeout=50)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED", text
    assert info["Restarts"] == "1", text
    assert sorted(p.name for p in run_dir.glob("signalled-*")) == ["signalled-0", "signalled-1"]
    assert sorted(p.name for p in run_dir.glob("ready-1-*")) == ["ready-1-0", "ready-1-1"]  # SLURM_RESTART_COUNT=1
    assert "training exited with status 124" in text
    assert "requeue 1 of at most 10" in text
    assert f"job {job_id} start 2" in text  # same job id, log appended
    assert re.findall(r"training exited with status (\d+)", text) == ["124", "0"]


@pytest.mark.slow
def test_time_limit_signal_checkpoints_and_requeues(slurm_env, tmp_path):
    """The template's own #SBATCH --signal (no scancel). Slurm checks every 30 s and signals once the
    time left is <= 20 + 30 s: 10-40 s after the start, when the stand-in is surely listening."""
    job_id, run_dir, log = submit_standin(slurm_env, tmp_path, "--time", "00:01:00", "--signal_seconds", "20")
    info = wait_for_end(slurm_env, job_id, log, timeout=90)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", text
    assert (run_dir / "signalled-0").exists() and (run_dir / "ready-1-0").exists()


def test_requeues_stop_at_the_limit(slurm_env, tmp_path):
    job_id, run_dir, log = submit_standin(slurm_env, tmp_path, "--time", "00:05:00", "--max_requeues", "0")
    signal_when_ready(slurm_env, job_id, run_dir, "ready-0-0", 1)
    info = wait_for_end(slurm_env, job_id, log, timeout=40)
    text = log.read_text()
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", text
    assert info["ExitCode"] == "124:0", text
    assert "already requeued 0 times (limit 0)" in text


def test_requeued_job_with_more_cpus_resumes_on_more_processes(slurm_env, tmp_path):
    """A CPU job of one training process is preempted at step 24 (checkpoint, exit 124; with
    --max_requeues 0 it ends there). Requeued held, given 2 CPUs per task instead of 1 (as if it came
    back on a bigger allocation) and released, the same script launches 2 processes, which resume from
    the checkpoint with the global batch kept: the steps and the LR column equal an uninterrupted
    one-process run's."""
    from helpers import TINY, read_metrics, train

    args = ["--recipe", str(REPO / "recipes" / "mnist1d_fast.yaml"), *TINY, "--train.num_epochs=4",
            "--checkpoint.every_n_steps=5", "--train.batch_size=32"]
    ref = tmp_path / "ref"
    assert train(*args, "--output_dir", str(ref)).returncode == 0

    run_dir = tmp_path / "run"
    script_path = render(["--recipe", args[1], "--nodes", "1", "--gpus_per_node", "0", "--num_processes", "1",
                          "--time", "00:05:00", "--max_requeues", "0", "--output_dir", str(run_dir), "--", *args[2:]])
    env = slurm_env.env(LAUNCHER_HOOKS="faults:from_env", LAUNCHER_TEST_PAUSE_AT_STEP="23", WANDB_MODE="disabled",
                        OMP_NUM_THREADS="1", PYTHONPATH=f"{REPO / 'tests'}")
    sbatch = subprocess.run(["sbatch", "--parsable", str(script_path)], env=env, capture_output=True, text=True,
                            check=True)
    job_id = sbatch.stdout.strip().split(";")[0]
    log = run_dir / "slurm" / f"mnist1d_fast-{job_id}.out"
    wait_for_files(".paused-rank0", run_dir, 1, timeout=120)
    slurm_env.run("scancel", "--signal=USR1", job_id)
    info = wait_for_end(slurm_env, job_id, log, timeout=90)
    assert info["ExitCode"] == "124:0", log.read_text()

    slurm_env.run("scontrol", "requeuehold", job_id)
    # CPUsPerTask sets SLURM_CPUS_PER_TASK, which the script counts; NumCPUs makes the allocation that big.
    slurm_env.run("scontrol", "update", f"JobId={job_id}", "NumCPUs=2", "CPUsPerTask=2")
    slurm_env.run("scontrol", "release", job_id)
    time.sleep(2)  # let slurmctld take the requeued job out of its finished state
    info = wait_for_end(slurm_env, job_id, log, timeout=300)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", text
    assert f"job {job_id} start 1 on" in text and "1 node x 1 process(es)" in text
    assert f"job {job_id} start 2 on" in text and "1 node x 2 process(es)" in text
    assert re.findall(r"training exited with status (\d+)", text) == ["124", "0"]
    assert "resume: 2 process(es) instead of 1: train.batch_size 32 -> 16" in text
    assert "step 24, epoch 1 + 8 steps; 1 -> 2 process(es), global batch 32 kept" in text
    (steps, evals), (ref_steps, ref_evals) = read_metrics(run_dir), read_metrics(ref)
    assert [(r["step"], r["lr"]) for r in steps] == [(r["step"], r["lr"]) for r in ref_steps]
    assert [r["step"] for r in steps] == list(range(1, 65))
    assert [r["step"] for r in evals] == [r["step"] for r in ref_evals]
    assert json.loads((run_dir / "plan.json").read_text())["num_processes"] == 2
