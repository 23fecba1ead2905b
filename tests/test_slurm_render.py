"""Rendering the Slurm templates (no cluster): options, quoting, and the script's own logic run
with stand-ins for srun/scontrol/sbatch/python on PATH."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launcher import slurm
from launcher.slurm_launch import group_status

REPO = Path(__file__).resolve().parent.parent
RECIPE = str(REPO / "recipes" / "mnist1d.yaml")
CPU_CONFIG = str(REPO / "accelerate_configs" / "cpu_ddp.yaml")
BASE = ["--recipe", RECIPE, "--nodes", "1", "--gpus_per_node", "0", "--time", "00:10:00"]


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """`python -m launcher.slurm argv` in-process: (exit status, stdout, stderr)."""
    old = sys.argv
    sys.argv = ["launcher.slurm", *argv]
    try:
        slurm.cli()
    except SystemExit as exit_:
        status = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        sys.argv = old
    out, err = capsys.readouterr()
    return status, out, err


def dry_run(argv: list[str], capsys) -> str:
    split = argv.index("--") if "--" in argv else len(argv)
    status, out, err = run_cli(["render", *argv[:split], "--dry_run", *argv[split:]], capsys)
    assert status == 0, err
    return out


def sbatch_options(script: str) -> dict[str, str]:
    options = {}
    for line in script.splitlines():
        if line.startswith("#SBATCH "):
            key, _, value = line[len("#SBATCH "):].partition("=")
            options[key] = value
    return options


def assert_sbatch_options(script: str, expected: dict[str, str]) -> dict[str, str]:
    """Check the script's #SBATCH options named in `expected`; returns all of them."""
    options = sbatch_options(script)
    assert {key: options.get(key) for key in expected} == expected
    return options


def bash_syntax_ok(script: str, tmp_path: Path) -> None:
    path = tmp_path / "syntax-check.sbatch"
    path.write_text(script)
    proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    """Each test runs in an empty directory, so the default runs/ folder lands there."""
    monkeypatch.chdir(tmp_path)


# ---------------------------------------------------------------------------------------------
# What the templates say
# ---------------------------------------------------------------------------------------------


def test_single_node_cpu_script(tmp_path, capsys):
    script = dry_run([*BASE, "--num_processes", "2", "--output_dir", "run"], capsys)
    run_dir = tmp_path / "run"
    opts = assert_sbatch_options(script, {
        "--job-name": "mnist1d",
        "--nodes": "1",
        "--ntasks-per-node": "1",
        "--cpus-per-task": "2",  # 2 processes x (1 + data.num_workers=0)
        "--time": "00:10:00",
        "--output": f"{run_dir}/slurm/%x-%j.out",
        "--open-mode": "append",
        "--signal": "USR1@285",  # no B: the srun step gets it, not the batch shell
        "--chdir": str(tmp_path),
    })
    assert "--requeue" in opts
    assert "--gres" not in opts and "--partition" not in opts and "--account" not in opts
    assert "export ACCELERATE_USE_CPU=true" in script
    # The counts come from the allocation at run time (test_launch_counts_follow_the_allocation).
    assert "REQUESTED_GPUS_PER_NODE=0 " in script and "REQUESTED_PROCESSES_PER_NODE=2\n" in script
    assert "REQUESTED_CPUS_PER_TASK=2\n" in script and "ADD_MULTI_GPU=yes " in script
    assert "  --mixed_precision no --dynamo_backend no\n" in script
    assert '--num_machines "$NODES" --num_processes "$TOTAL_PROCESSES"' in script
    assert "ACCELERATE_ARGS+=(--main_process_port 0)" in script
    assert ("bash -c 'exec \"$PYTHON\" -m launcher.slurm launch --machine_rank \"$SLURM_NODEID\" \"$@\"' launcher-task "
            '\\\n  "${ACCELERATE_ARGS[@]}" -m launcher.train "${TRAIN_ARGS[@]}"') in script
    assert f'--recipe {run_dir}/slurm/mnist1d.yaml --output_dir "$RUN_DIR" --resume auto' in script
    assert f"RUN_DIR={run_dir}\n" in script
    assert "MAX_REQUEUES=10\n" in script
    assert 'scontrol requeue "$SLURM_JOB_ID"' in script
    assert "{{" not in script and "}}" not in script
    assert not (tmp_path / "run").exists(), "--dry_run wrote something"
    bash_syntax_ok(script, tmp_path)


def test_multi_node_gpu_script(tmp_path, capsys):
    script = dry_run(["--recipe", RECIPE, "--nodes", "4", "--gpus_per_node", "8", "--time", "1-02:00:00",
                      "--output_dir", "run"], capsys)
    assert_sbatch_options(script, {"--nodes": "4", "--gres": "gpu:8", "--cpus-per-task": "8", "--time": "1-02:00:00"})
    assert "ACCELERATE_USE_CPU" not in script
    assert 'HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)' in script
    assert "REQUESTED_GPUS_PER_NODE=8 " in script
    assert '--main_process_ip "$HEAD_NODE" --main_process_port "$RDZV_PORT" --rdzv_backend c10d' in script
    assert 'srun --nodes="$NODES" --ntasks="$NODES" --ntasks-per-node=1 --cpus-per-task="$CPUS_PER_TASK"' in script
    assert "CPUS_PER_TASK=${SLURM_CPUS_PER_TASK:-$REQUESTED_CPUS_PER_TASK}" in script
    # Nothing on a code line pins a count of the render.
    code = [line for line in script.splitlines() if line and not line.lstrip().startswith("#")]
    assert not [line for line in code if re.search(r"--(num_machines|num_processes|nodes|ntasks)[ =]\d", line)]
    # $SLURM_NODEID may only appear inside the single-quoted program that each srun task runs.
    srun_call = script[script.index("srun --nodes"):script.index("|| status=$?")].replace("\\\n", " ")
    words = shlex.split(srun_call)
    program = words[words.index("-c") + 1]
    assert program == 'exec "$PYTHON" -m launcher.slurm launch --machine_rank "$SLURM_NODEID" "$@"'
    code_lines = [line for line in script.splitlines() if not line.lstrip().startswith("#")]
    assert all("'" in line for line in code_lines if "$SLURM_NODEID" in line)
    bash_syntax_ok(script, tmp_path)


def test_every_option(tmp_path, capsys):
    script = dry_run([
        "--recipe", RECIPE, "--nodes", "2", "--gpus_per_node", "0", "--num_processes", "3", "--time", "00:30:00",
        "--partition", "cpu,debug", "--account", "proj-1", "--job_name", "exp.7_a", "--accelerate_config",
        CPU_CONFIG, "--output_dir", "out/run", "--cpus_per_task", "6", "--max_requeues", "4",
        "--signal_seconds", "120"], capsys)
    assert_sbatch_options(script, {
        "--partition": "cpu,debug",
        "--account": "proj-1",
        "--job-name": "exp.7_a",
        "--cpus-per-task": "6",
        "--signal": "USR1@120",
        "--output": f"{tmp_path}/out/run/slurm/%x-%j.out",
    })
    assert "MAX_REQUEUES=4\n" in script
    # With a config file the config picks DDP/FSDP/DeepSpeed: no --multi_gpu that would override it.
    assert f"  --config_file {CPU_CONFIG}\n" in script
    assert "ADD_MULTI_GPU=no " in script
    assert "REQUESTED_PROCESSES_PER_NODE=3\n" in script and "REQUESTED_CPUS_PER_TASK=6\n" in script
    bash_syntax_ok(script, tmp_path)


def test_signal_follows_the_recipe_and_defaults_fit_short_jobs(capsys):
    script = dry_run([*BASE[:-1], "00:04:00", "--", "--checkpoint.signal=SIGUSR2"], capsys)
    assert sbatch_options(script)["--signal"] == "USR2@105"  # min(300, (limit - 30 s) / 2)
    assert "export LAUNCHER_PREEMPT_SIGNAL=SIGUSR2" in script


def test_overrides_are_read_like_the_trainer_reads_them(capsys):
    script = dry_run([*BASE, "--", "--optim.betas=[0.9,0.95]", "--optim.lr", "0.005", "--train.compile=true"], capsys)
    assert "'--optim.betas=[0.9,0.95]'\n  --optim.lr=0.005\n  --train.compile=true\n)" in script


def test_render_writes_script_and_recipe_copy_and_refuses_to_overwrite(tmp_path, capsys):
    status, out, err = run_cli(["render", *BASE, "--output_dir", "run", "--", "--optim.lr=0.004"], capsys)
    assert status == 0, err
    script_path = Path(out.strip())
    assert script_path == tmp_path / "run" / "slurm" / "job.sbatch"
    assert os.access(script_path, os.X_OK)
    assert (tmp_path / "run" / "slurm" / "mnist1d.yaml").read_text() == Path(RECIPE).read_text()
    assert "--optim.lr=0.004" in script_path.read_text()
    before = script_path.read_text()
    status, out, err = run_cli(["render", *BASE, "--output_dir", "run"], capsys)
    assert status == 2 and out == ""
    assert err.count("\n") == 1 and "already exists" in err
    assert script_path.read_text() == before


def test_default_run_dir_is_new_per_render(tmp_path, capsys):
    status, out, _ = run_cli(["render", *BASE], capsys)
    assert status == 0
    path = Path(out.strip())
    assert re.fullmatch(r"mnist1d-\d{8}-\d{6}", path.parent.parent.name)
    assert path.parent.parent.parent == tmp_path / "runs"
    status, out, _ = run_cli(["render", *BASE], capsys)
    assert status == 0 and Path(out.strip()) != path


# ---------------------------------------------------------------------------------------------
# Running the rendered script with stand-ins for srun, scontrol and the training launcher
# ---------------------------------------------------------------------------------------------

FAKE_SRUN = r"""#!/bin/bash
# Stand-in for srun: run the task once per node, like Slurm, with that node's SLURM_NODEID.
nodes=1
while [ $# -gt 0 ] && [ "${1#--}" != "$1" ]; do
  case "$1" in --nodes=*) nodes=${1#--nodes=} ;; esac
  echo "$1" >> "$FAKE_LOG/srun.options"
  shift
done
worst=0
for ((node = 0; node < nodes; node++)); do
  if [ "$1" = bash ]; then
    SLURM_NODEID=$node PYTHON="$FAKE_PYTHON" "$@"
  else  # "$PYTHON" was expanded by the batch shell: swap in the stand-in
    SLURM_NODEID=$node "$FAKE_PYTHON" "${@:2}"
  fi
  rc=$?
  [ $rc -gt $worst ] && worst=$rc
done
exit $worst
"""

FAKE_SCONTROL = r"""#!/bin/bash
echo "$*" >> "$FAKE_LOG/scontrol.calls"
if [ "$1 $2" = "show hostnames" ]; then printf 'node-a\nnode-b\n'; fi
"""

FAKE_PYTHON = """#!{python}
import json, os, sys
node = os.environ["SLURM_NODEID"]
with open(os.path.join(os.environ["FAKE_LOG"], "task-" + node + ".json"), "w") as f:
    json.dump(sys.argv[1:], f)
sys.exit(int(os.environ.get("FAKE_EXIT", "0")))
"""


def run_rendered(script_path: Path, tmp_path: Path, *, exit_code: int = 0, restart_count: int | None = None,
                 nodes: int = 1, slurm_env: dict[str, str] | None = None
                 ) -> tuple[subprocess.CompletedProcess, dict[int, list[str]], list[str]]:
    """Execute the rendered script with bash; returns the result, each node's launcher argv, scontrol calls.
    The allocation: `nodes` nodes (SLURM_JOB_NUM_NODES), plus `slurm_env` (SLURM_GPUS_ON_NODE, ...)."""
    bin_dir = tmp_path / "fakebin"
    log = tmp_path / "fakelog"
    bin_dir.mkdir(exist_ok=True)
    log.mkdir(exist_ok=True)
    for f in log.iterdir():
        f.unlink()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL),
                       ("fake-python", FAKE_PYTHON.format(python=sys.executable))):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k != "CUDA_VISIBLE_DEVICES"}
    env = {**base, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_PYTHON": str(bin_dir / "fake-python"),
           "FAKE_LOG": str(log), "FAKE_EXIT": str(exit_code), "SLURM_JOB_ID": "4242",
           "SLURM_JOB_NODELIST": "node-[a-b]" if nodes > 1 else "node-a",
           "SLURM_NODEID": "7",  # the batch node's own value: no task may see it
           "SLURM_JOB_NUM_NODES": str(nodes), **(slurm_env or {})}
    env.pop("SLURM_RESTART_COUNT", None)
    if restart_count is not None:
        env["SLURM_RESTART_COUNT"] = str(restart_count)
    proc = subprocess.run(["bash", str(script_path)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=30)
    tasks = {int(p.stem.split("-")[1]): json.loads(p.read_text()) for p in log.glob("task-*.json")}
    calls_file = log / "scontrol.calls"
    calls = calls_file.read_text().splitlines() if calls_file.exists() else []
    return proc, tasks, calls


def _value_after(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


HOSTILE_OVERRIDES = [
    "--tracking.wandb.name=$(touch {m}/dollar)",
    "--tracking.wandb.group=`touch {m}/backtick`",
    "--tracking.wandb.job_type=x; touch {m}/semicolon",
    "--tracking.wandb.entity=a\ntouch {m}/newline\n",
    "--tracking.wandb.project=it's \"quoted\" $HOME",
]


def test_multi_node_script_runs_with_per_node_rank_and_hostile_values_stay_text(tmp_path, capsys):
    markers = tmp_path / "markers"
    markers.mkdir()
    overrides = [o.format(m=markers) for o in HOSTILE_OVERRIDES]
    run_dir = tmp_path / "odd $(touch dir-marker) `touch tick-marker`; name"
    status, out, err = run_cli(["render", "--recipe", RECIPE, "--nodes", "2", "--gpus_per_node", "0",
                                "--num_processes", "2", "--time", "00:10:00", "--output_dir", str(run_dir),
                                "--", *overrides], capsys)
    assert status == 0, err
    script_path = Path(out.strip())
    bash_syntax_ok(script_path.read_text(), tmp_path)

    proc, tasks, calls = run_rendered(script_path, tmp_path, nodes=2)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(tasks) == [0, 1]
    for node, argv in tasks.items():
        assert argv[:3] == ["-m", "launcher.slurm", "launch"]
        assert _value_after(argv, "--machine_rank") == str(node)  # expanded in the task, not the batch shell
        assert _value_after(argv, "--main_process_ip") == "node-a"
        assert _value_after(argv, "--main_process_port") == str(20000 + 4242 % 20000)
        assert _value_after(argv, "--rdzv_backend") == "c10d"
        assert _value_after(argv, "--num_processes") == "4"
        train = argv[argv.index("launcher.train") + 1:]
        assert train[:6] == ["--recipe", str(run_dir / "slurm" / "mnist1d.yaml"), "--output_dir", str(run_dir),
                             "--resume", "auto"]
        assert train[6:] == overrides  # byte for byte, newlines and quotes included
    assert calls == ["show hostnames node-[a-b]"]  # no requeue after a clean exit
    assert list(markers.iterdir()) == [], "a rendered value was executed"
    assert not (tmp_path / "dir-marker").exists() and not (tmp_path / "tick-marker").exists()


def test_single_node_script_runs(tmp_path, capsys):
    status, out, err = run_cli(["render", *BASE, "--output_dir", "run", "--", "--optim.lr=0.01"], capsys)
    assert status == 0, err
    proc, tasks, calls = run_rendered(Path(out.strip()), tmp_path)
    assert proc.returncode == 0, proc.stderr
    argv = tasks[0]
    assert argv[:3] == ["-m", "launcher.slurm", "launch"] and _value_after(argv, "--machine_rank") == "0"
    assert argv[-1] == "--optim.lr=0.01"
    assert calls == []
    assert "training exited with status 0" in proc.stdout


def srun_options(tmp_path: Path) -> list[str]:
    return (tmp_path / "fakelog" / "srun.options").read_text().split()


def render_script(tmp_path: Path, capsys, *argv: str) -> Path:
    name = f"run{len(list(tmp_path.glob('run*')))}"
    status, out, err = run_cli(["render", "--recipe", RECIPE, "--time", "00:10:00", "--output_dir", name, *argv],
                               capsys)
    assert status == 0, err
    return Path(out.strip())


# (nodes, SLURM_* of the allocation) -> (processes per node, whether --multi_gpu is passed)
GPU_ALLOCATIONS = [
    (1, {"SLURM_GPUS_ON_NODE": "2"}, 2),
    (2, {"SLURM_GPUS_ON_NODE": "4"}, 4),
    (2, {"SLURM_GPUS_PER_NODE": "a100:4"}, 4),  # --gpus-per-node=a100:4
    (1, {"SLURM_GPUS_PER_NODE": "3"}, 3),
    (1, {"CUDA_VISIBLE_DEVICES": "0,1"}, 2),
    (1, {"SLURM_GPUS_ON_NODE": "1", "CUDA_VISIBLE_DEVICES": "0,1,2"}, 1),  # Slurm's count first
]


@pytest.mark.parametrize("rendered_nodes", [1, 2], ids=["single_node.sbatch", "multi_node.sbatch"])
@pytest.mark.parametrize(("nodes", "slurm_env", "per_node"), GPU_ALLOCATIONS)
def test_launch_counts_follow_the_allocation(tmp_path, capsys, rendered_nodes, nodes, slurm_env, per_node):
    """Rendered for 1 node x 2 GPUs or 2 nodes x 4 GPUs; run on whatever the allocation says (a requeued
    job that `scontrol update` gave other nodes or GPUs, or a resubmission): accelerate gets those counts."""
    script_path = render_script(tmp_path, capsys, "--nodes", str(rendered_nodes),
                                "--gpus_per_node", str(2 if rendered_nodes == 1 else 4))
    proc, tasks, calls = run_rendered(script_path, tmp_path, nodes=nodes, slurm_env=slurm_env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(tasks) == list(range(nodes))
    total = nodes * per_node
    options = srun_options(tmp_path)
    assert f"--nodes={nodes}" in options and f"--ntasks={nodes}" in options
    for node, argv in tasks.items():
        assert _value_after(argv, "--num_machines") == str(nodes)
        assert _value_after(argv, "--num_processes") == str(total)
        assert _value_after(argv, "--machine_rank") == str(node)
        assert ("--multi_gpu" in argv) == (total > 1)
        if nodes > 1:
            assert _value_after(argv, "--main_process_ip") == "node-a"
            assert _value_after(argv, "--main_process_port") == str(20000 + 4242 % 20000)
            assert _value_after(argv, "--rdzv_backend") == "c10d"
        else:
            assert _value_after(argv, "--main_process_port") == "0" and "--main_process_ip" not in argv
    assert calls == (["show hostnames node-[a-b]"] if nodes > 1 else [])
    where = f"{nodes} node(s) x {per_node}" if nodes > 1 else f"1 node x {per_node}"
    assert f"{where} process(es)" in proc.stdout


def test_a_gpu_job_without_a_gpu_count_uses_the_rendered_one(tmp_path, capsys):
    proc, tasks, _ = run_rendered(render_script(tmp_path, capsys, "--nodes", "2", "--gpus_per_node", "4"),
                                  tmp_path, nodes=2)
    assert proc.returncode == 0, proc.stderr
    assert _value_after(tasks[0], "--num_processes") == "8"
    assert "using the rendered 4 per node" in proc.stdout


@pytest.mark.parametrize(("argv", "cpus", "nodes", "per_node"), [
    (["--num_processes", "2"], None, 1, 2),  # no SLURM_CPUS_PER_TASK: the rendered count
    (["--num_processes", "2"], "2", 1, 2),  # the CPUs it was rendered for
    (["--num_processes", "1"], "2", 1, 2),  # `scontrol update JobId=.. CPUsPerTask=2` before a requeue
    (["--num_processes", "2"], "1", 1, 1),
    (["--num_processes", "3", "--cpus_per_task", "6"], "6", 2, 3),
    (["--num_processes", "3", "--cpus_per_task", "6"], "4", 1, 2),
])
def test_cpu_launch_counts_follow_the_cpus_per_task(tmp_path, capsys, argv, cpus, nodes, per_node):
    script_path = render_script(tmp_path, capsys, "--nodes", "1", "--gpus_per_node", "0", *argv)
    proc, tasks, _ = run_rendered(script_path, tmp_path, nodes=nodes,
                                  slurm_env={"SLURM_CPUS_PER_TASK": cpus} if cpus else {})
    assert proc.returncode == 0, proc.stderr
    argv0 = tasks[0]
    assert _value_after(argv0, "--num_processes") == str(nodes * per_node)
    assert ("--multi_gpu" in argv0) == (nodes * per_node > 1)
    assert f"--cpus-per-task={cpus or 2}" in srun_options(tmp_path)  # rendered: 2 processes x (1 + 0 workers)


def test_launch_counts_with_an_accelerate_config_add_no_multi_gpu(tmp_path, capsys):
    script_path = render_script(tmp_path, capsys, "--nodes", "1", "--gpus_per_node", "0", "--num_processes", "2",
                                "--accelerate_config", CPU_CONFIG)
    proc, tasks, _ = run_rendered(script_path, tmp_path, nodes=2, slurm_env={"SLURM_CPUS_PER_TASK": "2"})
    assert proc.returncode == 0, proc.stderr
    for argv in tasks.values():
        assert _value_after(argv, "--config_file") == CPU_CONFIG and "--multi_gpu" not in argv
        assert _value_after(argv, "--num_processes") == "4" and _value_after(argv, "--num_machines") == "2"


@pytest.mark.parametrize("nodes", [1, 2])
def test_preempted_exit_requeues_until_the_limit(tmp_path, capsys, nodes):
    argv = ["render", "--recipe", RECIPE, "--nodes", str(nodes), "--gpus_per_node", "0", "--time", "00:10:00",
            "--max_requeues", "2", "--output_dir", "run"]
    status, out, err = run_cli(argv, capsys)
    assert status == 0, err
    script_path = Path(out.strip())
    requeue = "requeue 4242"

    for restart_count in (None, 0, 1):
        proc, _, calls = run_rendered(script_path, tmp_path, exit_code=124, restart_count=restart_count, nodes=nodes)
        assert requeue in calls, proc.stdout + proc.stderr
        assert proc.returncode == 124

    proc, _, calls = run_rendered(script_path, tmp_path, exit_code=124, restart_count=2, nodes=nodes)
    assert requeue not in calls
    assert "already requeued 2 times (limit 2)" in proc.stdout
    assert f"continue with: sbatch {script_path}" in proc.stdout
    assert proc.returncode == 124

    for code in (1, 137):  # a crash or a kill is not a preemption: no requeue
        proc, _, calls = run_rendered(script_path, tmp_path, exit_code=code, restart_count=0, nodes=nodes)
        assert requeue not in calls
        assert proc.returncode == code


# ---------------------------------------------------------------------------------------------
# Errors: one line, exit 2, nothing written
# ---------------------------------------------------------------------------------------------


# Values refused for an option (the error names the option).
BAD_OPTIONS = [
    ("--gpus_per_node", "-1"), ("--job_name", "$(touch marker)"), ("--job_name", "a;b"),
    ("--partition", "gpu;touch marker"), ("--account", "a b"), ("--cpus_per_task", "0"), ("--max_requeues", "-1"),
    ("--signal_seconds", "600"),
    ("--signal_seconds", "570"),  # the 30 s tick could reach the start
    ("--accelerate_config", "nope.yaml"), ("--output_dir", "a#b"), ("--output_dir", "100%"),
]
# Training overrides (after a bare `--`) refused, and what the error names.
BAD_OVERRIDES = [
    ("--optim.lrr=0.1", "optim.lr"), ("--optim.lr=fast", "optim.lr"), ("optim.lr=0.1", "--section.key=value"),
    ("--optim.lr", "no value"), ("--output_dir=elsewhere", "output_dir"),
    ("--checkpoint.signal=SIGTERM", "checkpoint.signal"),
]


@pytest.mark.parametrize(("argv", "expected"), [
    (["render", *BASE[:-1], "1:00"], "--time"),
    (["render", *BASE[:-1], "00:61:00"], "--time"),
    (["render", *BASE[:-1], "00:00:00"], "longer than zero"),
    (["render", *BASE[:2], "--nodes", "0", *BASE[4:]], "--nodes"),
    (["render", *BASE[:2], "--nodes", "two", *BASE[4:]], "--nodes"),
    *[(["render", *BASE, option, value], option) for option, value in BAD_OPTIONS],
    (["render", *BASE[:4], "--gpus_per_node", "2", "--num_processes", "2", *BASE[6:]], "--num_processes"),
    (["render", "--recipe", "missing.yaml", *BASE[2:]], "missing.yaml"),
    (["render", *BASE[:-2]], "--time"),
    (["render", *BASE, "--bogus", "1"], "--bogus"),
    *[(["render", *BASE, "--", override], expected) for override, expected in BAD_OVERRIDES],
    (["submit", *BASE, "--", "--train.num_epochs=0"], "train.num_epochs"),
    (["deploy", *BASE], "deploy"),
])
def test_usage_errors(tmp_path, capsys, argv, expected):
    status, out, err = run_cli(argv, capsys)
    assert status == 2
    assert out == ""
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert expected in err
    assert list(tmp_path.iterdir()) == [], "a failed command wrote something"


def test_existing_run_directory_is_refused(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("name: earlier\n")
    status, _, err = run_cli(["render", *BASE, "--output_dir", "run"], capsys)
    assert status == 2 and "already exists" in err
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["config.yaml"]


def test_real_entry_point_one_line_error_and_nothing_runs(tmp_path):
    marker = tmp_path / "marker"
    proc = subprocess.run([sys.executable, "-m", "launcher.slurm", "submit", *BASE, "--job_name",
                           f"$(touch {marker})`touch {marker}`"], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2
    assert proc.stdout == "" and proc.stderr.count("\n") == 1 and "--job_name" in proc.stderr
    assert not marker.exists()
    assert list(tmp_path.iterdir()) == []


def test_help_explains_overrides(capsys):
    with pytest.raises(SystemExit) as exit_:
        slurm.main(["submit", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "after a bare `--`" in out and "--max_requeues" in out


def test_module_import_stays_light():
    code = "import sys, launcher.slurm; print(any(m in sys.modules for m in ('torch', 'accelerate')))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.stdout.strip() == "False", proc.stderr


def test_exit_statuses_come_from_the_trainer_side():
    """The requeue status is the trainer's own constant, not a copy that could drift."""
    import inspect

    from launcher import cli, preemption, slurm_launch

    assert slurm.PREEMPTED_EXIT == slurm_launch.PREEMPTED_EXIT == preemption.PREEMPTED_EXIT == 124
    for module in (slurm, slurm_launch, cli):
        assert not re.search(r"^\w*EXIT\w* = \d+", inspect.getsource(module), re.M), module.__name__


# ---------------------------------------------------------------------------------------------
# submit, with a stand-in sbatch
# ---------------------------------------------------------------------------------------------


def _fake_sbatch(tmp_path: Path, monkeypatch, body: str) -> None:
    bin_dir = tmp_path.parent / f"{tmp_path.name}-bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text("#!/bin/bash\n" + body)
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")


def test_submit_prints_job_id_and_log(tmp_path, capsys, monkeypatch):
    _fake_sbatch(tmp_path, monkeypatch, 'echo "$@" > "$(dirname "$2")/sbatch.args"; echo "77;cluster"\n')
    status, out, err = run_cli(["submit", *BASE, "--job_name", "demo", "--output_dir", "run"], capsys)
    assert status == 0, err
    assert out.splitlines() == ["job 77", f"log {tmp_path}/run/slurm/demo-77.out"]
    assert (tmp_path / "run/slurm/sbatch.args").read_text().split() == [
        "--parsable", str(tmp_path / "run/slurm/job.sbatch")]


def test_refused_submission_leaves_nothing(tmp_path, capsys, monkeypatch):
    _fake_sbatch(tmp_path, monkeypatch, 'echo "sbatch: error: invalid partition specified: gpu" >&2; exit 1\n')
    status, out, err = run_cli(["submit", *BASE, "--output_dir", "run"], capsys)
    assert status == 2 and out == ""
    assert err.count("\n") == 1 and "invalid partition" in err
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# The in-job launcher keeps the training exit status and survives the preemption signal
# ---------------------------------------------------------------------------------------------

STANDIN = """\
import os, signal, sys, time
got = []
signal.signal(signal.SIGUSR1, lambda *_: got.append(1))
rank = os.environ.get("RANK", "0")
open(os.path.join(sys.argv[1], "ready-" + rank), "w").close()
deadline = time.time() + 30
while not got and time.time() < deadline:
    time.sleep(0.02)
if rank == "1" and sys.argv[3] == "lag":  # still tearing down when rank 0 leaves: the agent SIGTERMs it
    time.sleep(20)
sys.exit(int(sys.argv[2]) if got else 3)
"""


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


@pytest.mark.parametrize(("codes", "expected"), [
    ([124], 124), ([124, 124], 124), ([124, -15], 124), ([-9, 124], 124),  # laggards stopped by the agent
    ([1], 1), ([124, 1], 1), ([1, 124], 1), ([-15], 143), ([-11, 124], 139), ([3, -15], 3)])
def test_group_status(codes, expected):
    assert group_status(codes) == expected


@pytest.mark.slow
@pytest.mark.parametrize(("num_processes", "worker_exit", "lag", "expected"), [
    (2, 124, "", 124), (2, 124, "lag", 124), (2, 5, "", 5), (2, 5, "lag", 5), (1, 124, "", 124)])
def test_launch_passes_on_the_training_exit_status(tmp_path, num_processes, worker_exit, lag, expected):
    """What Slurm does to the step (signal every process of the tree) must leave 124 intact."""
    (tmp_path / "standin.py").write_text(STANDIN)
    accelerate = ["--num_processes", str(num_processes), "--num_machines", "1", "--main_process_port", "0",
                  "--mixed_precision", "no", "--dynamo_backend", "no"]
    if num_processes > 1:
        accelerate.insert(0, "--multi_gpu")
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "PYTHONPATH": str(REPO), "LAUNCHER_PREEMPT_SIGNAL": "SIGUSR1"}
    proc = subprocess.Popen([sys.executable, "-m", "launcher.slurm", "launch", *accelerate,
                             str(tmp_path / "standin.py"), str(tmp_path), str(worker_exit), lag or "-"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while len(list(tmp_path.glob("ready-*"))) < num_processes:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
            time.sleep(0.05)
        for pid in [proc.pid, *_descendants(proc.pid)]:
            os.kill(pid, signal.SIGUSR1)
        output = proc.communicate(timeout=60)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == expected, output
    if lag:
        assert "closing signal SIGTERM" in output  # the agent did stop the lagging rank
