"""`launcher.sweep --slurm` on the real one-node test cluster (tests/slurm_cluster.py): one job array, one
point a task, every run directory completed; while the array runs the same command refuses to
submit again; once it has ended, the same command submits nothing and writes the report."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import ROOT, assert_usage_error, run

pytestmark = pytest.mark.slurm




def test_sweep_as_a_job_array(cluster, tmp_path):
    out = tmp_path / "sw"
    cmd = [sys.executable, "-m", "launcher.sweep", "--recipe", str(ROOT / "recipes" / "mnist1d.yaml"),
           "--grid", "optim.lr=5e-3,2e-2", "--slurm", "--time", "00:05:00", "--parallel", "2",
           "--output_dir", str(out), "--train.num_epochs=1", "--task.options.num_train=256",
           "--task.options.num_test=128"]
    conf = str(cluster.conf)
    refused = run([*cmd, "--partition", "no-such-partition"], timeout=120, SLURM_CONF=conf)
    assert_usage_error(refused, "sbatch refused the array")
    assert not out.exists()  # nothing submitted, nothing left behind
    proc = run(cmd, timeout=120, SLURM_CONF=conf)
    assert proc.returncode == 0, proc.stderr
    job_id = re.search(r"^job (\d+)$", proc.stdout, re.M).group(1)
    script = next((out / "slurm").glob("array-*.sbatch")).read_text()
    assert "#SBATCH --array=0-1%2" in script

    busy = run(cmd, timeout=120, SLURM_CONF=conf)  # the array is still queued or running
    if cluster.run("squeue", "-h", "-j", job_id, check=False).stdout.strip():
        assert_usage_error(busy, "still queued or running")

    deadline = time.monotonic() + 240
    while cluster.run("squeue", "-h", "-j", job_id, check=False).stdout.strip():
        assert time.monotonic() < deadline, subprocess.run(["tail", "-n", "20", *map(str, out.glob("slurm/*.out"))],
                                                           capture_output=True, text=True).stdout
        time.sleep(1)
    logs = sorted((out / "slurm").glob(f"sw-{job_id}_*.out"))
    assert len(logs) == 2, logs
    for name in ("lr0.005-seed0", "lr0.02-seed0"):
        summary = json.loads((out / name / "summary.json").read_text())
        assert summary["status"] == "completed" and summary["final_epoch"] == 1, name
    assert all("training exited with status 0" in log.read_text() for log in logs)

    report = run(cmd, timeout=120, SLURM_CONF=conf)
    assert report.returncode == 0, report.stderr
    assert "nothing to submit" in report.stdout and "submitted" not in report.stdout
    assert (out / "slurm" / "jobs.txt").read_text().split() == [job_id]
    result = json.loads((out / "sweep.json").read_text())["results"]
    assert [p["n"] for p in result["points"]] == [1, 1]
    assert (out / "sweep.md").is_file() and (out / "sweep.png").is_file()
