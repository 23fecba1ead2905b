"""Launching: every accelerate config, the ways a launch goes silently wrong, and clean exits.

Real processes throughout: the configs are read by accelerate's own launch code, and the launches
are real `accelerate launch` / `torchrun` runs of 2 gloo processes on this CPU machine:
- `torchrun --nproc_per_node 2` and `accelerate launch --multi_gpu --num_processes 2` without any CPU
  flag really train as ONE 2-process job (the launcher passes cpu=True when no GPU is present);
- `accelerate launch --cpu --num_processes 2` and a `use_cpu: true` / MULTI_CPU config start ONE
  process: it stops with exit 2 and one line that names the fix, before writing anything;
- a config that needs GPUs (FSDP) is refused on CPU instead of degrading to plain DDP;
- 2 machines x 1 process through accelerate_configs/multi_node.yaml (c10d rendezvous on 127.0.0.1).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from launcher.launch_checks import requested_processes

from helpers import (
    ACCELERATE,
    EXITS_ENV,
    ROOT,
    assert_usage_exits,
    free_port,
    kill_group,
    read_metrics,
    recording_exits,
    run,
    start,
)

CONFIGS = ROOT / "accelerate_configs"
SMALL = ["--recipe", "recipes/mnist1d.yaml", "--task.options.num_train=320", "--task.options.num_test=100",
         "--train.num_epochs=1", "--train.batch_size=16", "--checkpoint.enabled=false"]
STEPS = 320 // 32  # optimizer steps of SMALL on 2 processes (global batch 32)


# ---------------------------------------------------------------------------------------------
# The configs, read by accelerate's own launch code (no processes started)
# ---------------------------------------------------------------------------------------------


def _resolve_launch(*argv: str):
    """What `accelerate launch argv -m launcher.train` would do: (launcher kind, args, environment)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args, defaults, mp_from_config = _validate_launch_command(
        launch_command_parser().parse_args([*argv, "-m", "launcher.train"]))
    if args.use_deepspeed:
        fields = list(defaults.deepspeed_config) + (["mixed_precision"] if mp_from_config else [])
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)
        return "deepspeed", args, prepare_deepspeed_cmd_env(args)[1]
    if args.multi_gpu or args.use_fsdp:
        return "multi_gpu", args, prepare_multi_gpu_env(args)
    return "simple", args, {}


EXPECTED = {  # config: (launcher, total processes, machines, extra env that must be set)
    "cpu_ddp.yaml": ("multi_gpu", 2, 1, {"ACCELERATE_MIXED_PRECISION": "no"}),
    "single_gpu.yaml": ("simple", 1, 1, {}),
    "multi_gpu.yaml": ("multi_gpu", 8, 1, {"ACCELERATE_MIXED_PRECISION": "bf16"}),
    "multi_node.yaml": ("multi_gpu", 16, 2, {"ACCELERATE_MIXED_PRECISION": "bf16"}),
    "fsdp.yaml": ("multi_gpu", 8, 1, {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2",
                                      "FSDP_AUTO_WRAP_POLICY": "SIZE_BASED_WRAP", "FSDP_RESHARD_AFTER_FORWARD": "true"}),
    "deepspeed_zero2.yaml": ("deepspeed", 8, 1, {"ACCELERATE_USE_DEEPSPEED": "true",
                                                 "ACCELERATE_DEEPSPEED_CONFIG_FILE": "accelerate_configs/deepspeed/zero2.json"}),
    "deepspeed_zero3.yaml": ("deepspeed", 8, 1, {"ACCELERATE_USE_DEEPSPEED": "true",
                                                 "ACCELERATE_DEEPSPEED_CONFIG_FILE": "accelerate_configs/deepspeed/zero3.json"}),
    "cpu_deepspeed_zero2.yaml": ("deepspeed", 2, 1, {"ACCELERATE_USE_DEEPSPEED": "true"}),
    "cpu_deepspeed_zero3.yaml": ("deepspeed", 2, 1, {"ACCELERATE_USE_DEEPSPEED": "true",
                                                     "ACCELERATE_DEEPSPEED_CONFIG_FILE": "accelerate_configs/deepspeed/zero3.json"}),
}


def test_every_config_is_covered():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_launches_what_its_header_says(name, monkeypatch):
    monkeypatch.chdir(ROOT)
    text = (CONFIGS / name).read_text()
    header = [line for line in text.splitlines() if line.startswith("#")]
    assert any(f"accelerate launch --config_file accelerate_configs/{name}" in line for line in header), name
    assert any("Fields to change" in line for line in header), name
    kind, args, env = _resolve_launch("--config_file", f"accelerate_configs/{name}")
    launcher, processes, machines, wanted_env = EXPECTED[name]
    assert (kind, args.num_processes, args.num_machines) == (launcher, processes, machines)
    assert {k: env.get(k) for k in wanted_env} == wanted_env
    assert not yaml.safe_load(text).get("use_cpu"), "use_cpu: true makes accelerate start ONE process"


def test_deepspeed_configs_leave_precision_to_the_command_line():
    # Accelerate refuses mixed_precision in an accelerate config that names a deepspeed_config_file.
    for name in ("deepspeed_zero2.yaml", "deepspeed_zero3.yaml", "cpu_deepspeed_zero2.yaml", "cpu_deepspeed_zero3.yaml"):
        assert "mixed_precision" not in yaml.safe_load((CONFIGS / name).read_text()), name


def test_multi_node_config_rendezvous_at_the_main_machine(monkeypatch):
    monkeypatch.chdir(ROOT)
    _, args, _ = _resolve_launch("--config_file", "accelerate_configs/multi_node.yaml", "--rdzv_backend", "c10d",
                                 "--machine_rank", "1")
    assert (args.rdzv_backend, args.rdzv_endpoint, args.nnodes, args.nproc_per_node, args.node_rank) == \
        ("c10d", "10.0.0.1:29500", "2", "8", 1)


def test_fsdp_config_builds_an_fsdp2_plugin(monkeypatch):
    from accelerate.utils import FullyShardedDataParallelPlugin

    monkeypatch.chdir(ROOT)
    _, _, env = _resolve_launch("--config_file", "accelerate_configs/fsdp.yaml")
    for key, value in env.items():
        if key.startswith(("FSDP_", "ACCELERATE_USE_FSDP")):
            monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert plugin.auto_wrap_policy.__name__ == "size_based_auto_wrap_policy" and plugin.min_num_params == 1_000_000


# ---------------------------------------------------------------------------------------------
# Reading the parent's `accelerate launch` command line
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def multi_cpu_config(tmp_path) -> Path:
    path = tmp_path / "multi_cpu.yaml"
    path.write_text(yaml.safe_dump({"compute_environment": "LOCAL_MACHINE", "distributed_type": "MULTI_CPU",
                                    "num_processes": 2, "num_machines": 1, "machine_rank": 0, "use_cpu": True,
                                    "mixed_precision": "no"}))
    return path


@pytest.mark.parametrize(("argv", "wanted"), [
    (["/venv/bin/python3", "/venv/bin/accelerate", "launch", "--cpu", "--num_processes", "2", "-m", "launcher.train"], 2),
    (["python", "-m", "accelerate.commands.launch", "--num_processes=3", "train.py", "--x", "1"], 3),
    (["/venv/bin/accelerate-launch", "--cpu", "--num_processes", "1", "train.py"], 1),
    (["python", "-m", "launcher.slurm", "launch", "--machine_rank", "0", "--cpu", "--num_processes", "4", "-m", "x"], 4),
    (["/venv/bin/python3", "/venv/bin/torchrun", "--nproc_per_node", "2", "-m", "launcher.train"], None),
    (["python", "-m", "launcher.train", "--recipe", "r.yaml"], None),
    (["bash"], None),
])
def test_requested_processes_from_a_command_line(argv, wanted):
    assert requested_processes(argv) == wanted


def test_requested_processes_reads_the_named_config_relative_to_the_launch_directory(multi_cpu_config):
    argv = ["accelerate", "launch", "--config_file", multi_cpu_config.name, "-m", "launcher.train"]
    assert requested_processes(argv, cwd=str(multi_cpu_config.parent)) == 2
    assert requested_processes([*argv[:2], "--num_processes", "1", *argv[2:]], cwd=str(multi_cpu_config.parent)) == 1


# ---------------------------------------------------------------------------------------------
# Real launches
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("how", ["--cpu flag", "MULTI_CPU config"])
def test_accelerate_starting_one_process_for_two_is_stopped(how, tmp_path, multi_cpu_config):
    launch = ["--cpu", "--num_processes", "2"] if how == "--cpu flag" else ["--config_file", str(multi_cpu_config)]
    run_dir = tmp_path / "run"
    proc = run([*ACCELERATE, *launch, "-m", "launcher.train", *SMALL, "--output_dir", str(run_dir)])
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [
        "error: `accelerate launch` was asked for 2 processes but started only this one (it runs --cpu, use_cpu: true "
        "and MULTI_CPU configs as a single process); on CPU use `accelerate launch --config_file "
        "accelerate_configs/cpu_ddp.yaml -m launcher.train ...` (or --multi_gpu --num_processes 2, without --cpu)"]
    assert "returned non-zero exit status 2" in proc.stderr  # accelerate reports our status, then exits 1
    assert not run_dir.exists()


@pytest.mark.slow
def test_fsdp_config_on_cpu_is_refused_not_degraded(tmp_path):
    run_dir = tmp_path / "run"
    proc = run([*ACCELERATE, "--config_file", "accelerate_configs/fsdp.yaml", "--num_processes", "2",
                "--mixed_precision", "no", *recording_exits("launcher.train"), *SMALL, "--output_dir", str(run_dir)],
               **{EXITS_ENV: str(tmp_path / "exits")})
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: FSDP needs GPUs"), proc.stderr[-3000:]
    assert_usage_exits(tmp_path / "exits")
    assert not run_dir.exists()


TWO_PROCESS_LAUNCHES = {
    "cpu_ddp.yaml": [*ACCELERATE, "--config_file", "accelerate_configs/cpu_ddp.yaml"],
    "torchrun": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
    "--multi_gpu": [*ACCELERATE, "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
                    "no", "--dynamo_backend", "no", "--main_process_port", "0"],
}


@pytest.mark.slow
def test_two_process_launches_are_one_job_and_exit_cleanly(tmp_path):
    """Three consecutive 2-process runs, one per launcher: each is one real 2-process job, exit 0."""
    statuses = {}
    for name, launcher in TWO_PROCESS_LAUNCHES.items():
        run_dir = tmp_path / name.strip("-").replace(".", "_")
        proc = run([*launcher, "-m", "launcher.train", *SMALL, "--output_dir", str(run_dir)])
        statuses[name] = proc.returncode
        assert proc.returncode == 0, f"{name}: {proc.stdout[-1500:]}{proc.stderr[-3000:]}"
        assert "terminate called" not in proc.stderr, name
        assert "topology: MULTI_CPU, 2 process(es) on 1 machine(s), device cpu, mixed precision no" in proc.stdout, name
        assert "batch: 16 per device x 2 processes x 1 accumulation = 32 global" in proc.stdout, name
        assert proc.stdout.count("completed:") == 1, name  # not two processes each believing it is alone
        plan = json.loads((run_dir / "plan.json").read_text())
        assert (plan["num_processes"], plan["global_batch"], plan["steps_per_epoch"]) == (2, 32, STEPS)
        steps, _ = read_metrics(run_dir)
        assert [r["step"] for r in steps] == list(range(1, STEPS + 1)), name
    assert statuses == dict.fromkeys(TWO_PROCESS_LAUNCHES, 0)


@pytest.mark.slow
def test_multi_node_config_with_two_local_machines(tmp_path):
    port = free_port()
    run_dir = tmp_path / "run"
    common = ["--config_file", "accelerate_configs/multi_node.yaml", "--rdzv_backend", "c10d", "--main_process_ip",
              "127.0.0.1", "--main_process_port", str(port), "--num_processes", "2", "--num_machines", "2",
              "--mixed_precision", "no", "-m", "launcher.train", *SMALL, "--output_dir", str(run_dir)]
    def machine(rank: int) -> subprocess.Popen:
        return start([*ACCELERATE, "--machine_rank", str(rank), *common])

    # Both "machines" share 127.0.0.1, so either could host the rendezvous store; machine 0 must, or
    # its launcher finds main_process_port taken and gives up. Start machine 1 once the store listens.
    machines = [machine(0)]
    try:
        deadline = time.monotonic() + 120
        while machines[0].poll() is None and time.monotonic() < deadline:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.2)
        machines.append(machine(1))
        outputs = [m.communicate(timeout=300) for m in machines]
    finally:
        for m in machines:
            if m.poll() is None:
                kill_group(m)
    assert [m.returncode for m in machines] == [0, 0], [err[-3000:] for _, err in outputs]
    stdout = "".join(out for out, _ in outputs)
    assert "topology: MULTI_CPU, 2 process(es) on 2 machine(s)" in stdout
    assert stdout.count("completed:") == 1
    assert json.loads((run_dir / "plan.json").read_text())["num_machines"] == 2


# ---------------------------------------------------------------------------------------------
# launcher.output: who prints, who decides
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("rank", "world", "waits"), [("0", "2", False), ("1", "2", True), ("1", None, False)])
def test_only_the_other_ranks_of_a_group_wait_for_rank_0_to_report(rank, world, waits, monkeypatch):
    from launcher import output

    slept = []
    monkeypatch.setattr(output.time, "sleep", slept.append)
    monkeypatch.setenv("RANK", rank)
    if world is None:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("WORLD_SIZE", world)
    output.let_main_rank_report_first(5)
    assert slept == ([5] if waits else [])


def test_agree_returns_the_main_process_decision_or_raises_its_problem():
    from types import SimpleNamespace

    from launcher.errors import UsageError
    from launcher.output import agree

    one = SimpleNamespace(is_main_process=True, num_processes=1)
    assert agree(one, lambda: ("runs/a", None)) == "runs/a"
    with pytest.raises(UsageError, match="^already exists$"):
        agree(one, lambda: (None, "already exists"))
    asked = []
    other_rank = SimpleNamespace(is_main_process=False, num_processes=1)
    assert agree(other_rank, lambda: asked.append(1) or ("x", None)) is None  # only the main process decides
    assert asked == []
