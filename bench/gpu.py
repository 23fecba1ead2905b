"""GPU throughput on one GPU: CIFAR ResNet-18 images/s, GPT tokens/s and MFU, DDP vs FSDP vs ZeRO-2/3.

    python bench/gpu.py                        # one GPU, under 8 minutes on an H200; prints a table
    python bench/gpu.py --budget 300 --markdown gpu.md
    python bench/gpu.py --smoke                # the same plumbing on CPU with tiny models (no GPU needed)

Without CUDA (and without --smoke) it prints why and exits 0, writing a "skipped" section.

Every measurement is a real launch of the Trainer (the same code as `launcher.train`) in a fresh
process group, with the launcher's own accelerate config; inside, each flush of the step rows (every
10 steps: the host reads them back, so the device has finished those steps) is timestamped (rank 0)
and throughput is taken over the steps after the first `--warmup_steps` (torch.compile, cuDNN
autotuning and allocator growth happen there). Evaluation is moved past the end of the run and
checkpoints are off. Peak memory is `torch.cuda.max_memory_allocated()` over the run.

1. CIFAR-10 ResNet-18 (recipes/cifar10_resnet18.yaml: bf16, channels_last, batch 128, crop/flip on 2
   loader workers): images/s. Synthetic uint8 images of CIFAR's shape when the dataset is not under
   data.root (the machine may have no network); the table says which.
2. GPT small (recipes/gpt_small.yaml: 6x384, context 256, batch 64, bf16, torch.compile): tokens/s
   and MFU = tokens/s x flops_per_token / the GPU's dense bf16 peak (H100/H200: 989 TFLOP/s).
3. The same GPT without torch.compile on one process under each engine: no wrapper
   (accelerate_configs/single_gpu.yaml), DDP (torchrun, 1 process), FSDP2 (fsdp.yaml), DeepSpeed
   ZeRO-2 and ZeRO-3 (deepspeed_zero{2,3}.yaml), each with --num_processes 1: tokens/s and peak memory.
   The "engine" column is what the run reported, not what was asked for.

Runs that fail or do not fit the remaining --budget are reported as such; the rest still run.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
COMMON = {"train.eval_every_n_epochs": "1000000", "checkpoint.enabled": "false", "train.progress_bar": "off",
          "train.log_every_n_steps": "10",
          "tracking.wandb.enabled": "false"}


@dataclass
class Case:
    name: str
    recipe: str
    launch: list[str]
    """The command that starts the worker (accelerate launch ... / torchrun ... / python)."""
    overrides: dict[str, str] = field(default_factory=dict)
    what: str = "tokens"
    """`tokens` (GPT) or `images` (CIFAR)."""


def gpu_cases(steps: int, synthetic_cifar: bool) -> list[Case]:
    gpt = {"task.options.val_samples": "64", "train.max_steps": str(steps)}
    eager = {**gpt, "train.compile": "false"}
    one = ["--num_processes", "1"]
    cifar_task = {"task.name": "gpu:synthetic_cifar10"} if synthetic_cifar else {}
    return [
        Case("gpt_small bf16 compile", "recipes/gpt_small.yaml",
             [*ACCELERATE, "--config_file", "accelerate_configs/single_gpu.yaml"], gpt),
        Case("cifar10 resnet18 bf16" + (" (synthetic data)" if synthetic_cifar else ""), "recipes/cifar10_resnet18.yaml",
             [*ACCELERATE, "--config_file", "accelerate_configs/single_gpu.yaml"],
             {**cifar_task, "train.max_steps": str(steps), "task.options.val_subset": "512"}, what="images"),
        Case("gpt_small bf16, no wrapper", "recipes/gpt_small.yaml",
             [*ACCELERATE, "--config_file", "accelerate_configs/single_gpu.yaml"], eager),
        Case("gpt_small bf16, DDP", "recipes/gpt_small.yaml", TORCHRUN,
             {**eager, "train.mixed_precision": "bf16"}),
        Case("gpt_small bf16, FSDP2", "recipes/gpt_small.yaml",
             [*ACCELERATE, "--config_file", "accelerate_configs/fsdp.yaml", *one], eager),
        Case("gpt_small bf16, ZeRO-2", "recipes/gpt_small.yaml",
             [*ACCELERATE, "--config_file", "accelerate_configs/deepspeed_zero2.yaml", *one,
              "--mixed_precision", "bf16"], eager),
        Case("gpt_small bf16, ZeRO-3", "recipes/gpt_small.yaml",
             [*ACCELERATE, "--config_file", "accelerate_configs/deepspeed_zero3.yaml", *one,
              "--mixed_precision", "bf16"], eager),
    ]


def smoke_cases(steps: int) -> list[Case]:
    """The same plumbing on CPU: tiny models, fp32, no compile, the engines a CPU can run."""
    gpt = {"task.options.n_layer": "1", "task.options.n_head": "2", "task.options.n_embd": "64",
           "task.options.block_size": "64", "task.options.max_bytes": "400000", "task.options.val_samples": "16",
           "train.batch_size": "8", "train.max_steps": str(steps), "train.mixed_precision": "no",
           "train.compile": "false"}
    return [
        Case("gpt tiny fp32 (smoke)", "recipes/gpt_small.yaml", [sys.executable], gpt),
        Case("cifar10 resnet_tiny (synthetic data, smoke)", "recipes/cifar10_resnet18.yaml", [sys.executable],
             {"task.name": "gpu:synthetic_cifar10", "task.model": "resnet_tiny", "task.options.subset": "512",
              "task.options.val_subset": "64", "train.batch_size": "16", "train.max_steps": str(steps),
              "train.mixed_precision": "no", "train.channels_last": "false", "data.num_workers": "0"}, what="images"),
        Case("gpt tiny, DDP (smoke)", "recipes/gpt_small.yaml", TORCHRUN, gpt),
        Case("gpt tiny, accelerate launch (smoke)", "recipes/gpt_small.yaml",
             [*ACCELERATE, "--config_file", "accelerate_configs/single_gpu.yaml", "--mixed_precision", "no"], gpt),
    ]


# ---------------------------------------------------------------------------------------------
# Inside the launched process
# ---------------------------------------------------------------------------------------------


def synthetic_cifar10(task_cfg, data_cfg):
    """The cifar10 task on random uint8 images of CIFAR-10's shape (same model, transforms, batch)."""
    import numpy as np

    import launcher.tasks.cifar10 as cifar10

    rng = np.random.default_rng(0)

    def arrays(root: str, url: str = "") -> dict:
        return {"x": rng.integers(0, 256, (50_000, 3, 32, 32), dtype=np.uint8),
                "y": rng.integers(0, 10, 50_000, dtype=np.int64),
                "x_test": rng.integers(0, 256, (10_000, 3, 32, 32), dtype=np.uint8),
                "y_test": rng.integers(0, 10, 10_000, dtype=np.int64)}

    cifar10.load_arrays = arrays
    return cifar10.build(type(task_cfg)(name="cifar10", model=task_cfg.model, options=task_cfg.options), data_cfg)


def worker(recipe: str, overrides: dict[str, str], out: str) -> None:
    import torch

    from launcher.config import load_config
    from launcher.distributed import make_accelerator
    from launcher.hooks import Hooks
    from launcher.throughput import peak_flops
    from launcher.trainer import Trainer

    cfg = load_config(recipe, {**COMMON, **overrides})
    accelerator = make_accelerator(cfg.train, cfg.optim.clip_grad_norm)
    run_dir = tempfile.mkdtemp(prefix="bench-gpu-run-")
    trainer = Trainer(cfg, run_dir, accelerator)
    stamps: list[tuple[int, float]] = []  # (optimizer step, time) at each flush: the device has finished those steps

    class Stamp:
        def on_flush(self, trainer, rows):
            if rows:
                stamps.append((rows[-1]["step"], time.perf_counter()))

    trainer.hooks = Hooks([*trainer.hooks.hooks, Stamp()])
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    try:
        trainer.train()
    finally:
        trainer.close()
    if accelerator.is_main_process:
        result = {
            "stamps": stamps, "distributed_type": trainer.plan.distributed_type,
            "mixed_precision": trainer.plan.mixed_precision, "num_processes": trainer.plan.num_processes,
            "global_batch": trainer.plan.global_batch, "tokens_per_sample": trainer.task.tokens_per_sample,
            "flops_per_token": trainer.task.flops_per_token, "peak_flops": peak_flops(cfg.train.peak_tflops, accelerator),
            "compile": cfg.train.compile, "device": torch.cuda.get_device_name(0) if cuda else "cpu",
            "max_memory_allocated": torch.cuda.max_memory_allocated() if cuda else None,
            "max_memory_reserved": torch.cuda.max_memory_reserved() if cuda else None,
            "description": trainer.task.description,
        }
        Path(out).write_text(json.dumps(result))


# ---------------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------------


def run_case(case: Case, timeout: float, work: Path, warmup_steps: int) -> dict:
    out = work / f"{abs(hash(case.name))}.json"
    log = work / f"{abs(hash(case.name))}.log"
    args = [str(Path(__file__).resolve()), "_worker", case.recipe, json.dumps(case.overrides), str(out)]
    cmd = [*case.launch, *args]
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), str(REPO / "bench"), os.environ.get("PYTHONPATH")) if p)}
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return {"name": case.name, "error": f"timed out after {timeout:.0f}s", "seconds": timeout}
    seconds = time.perf_counter() - start
    if code != 0 or not out.exists():
        lines = [x for x in log.read_text(errors="replace").splitlines() if x.strip()]
        why = next((x for x in reversed(lines) if "Error" in x or "error:" in x), lines[-1] if lines else "no output")
        return {"name": case.name, "error": f"exit {code}: {why.strip()[:200]}", "seconds": seconds, "log": str(log)}
    r = json.loads(out.read_text())
    stamps = [tuple(x) for x in r["stamps"]]  # (step, seconds) at each flush
    window = [x for x in stamps if x[0] > warmup_steps] or stamps[-2:]
    if len(window) < 2:
        return {"name": case.name, "error": f"only {len(stamps)} flushes", "seconds": seconds}
    steps = window[-1][0] - window[0][0]
    per_sec = steps / (window[-1][1] - window[0][1])
    row = {"name": case.name, "seconds": seconds, "what": case.what, **r, "measured_steps": steps,
           "steps_per_sec": per_sec, "samples_per_sec": per_sec * r["global_batch"],
           "step_ms_median": 1e3 * statistics.median((tb - ta) / (sb - sa) for (sa, ta), (sb, tb)
                                                     in zip(window, window[1:]))}
    row.pop("stamps")
    if r["tokens_per_sample"]:
        row["tokens_per_sec"] = row["samples_per_sec"] * r["tokens_per_sample"]
        if r["peak_flops"] and r["flops_per_token"]:
            row["mfu"] = row["tokens_per_sec"] * r["flops_per_token"] / (r["peak_flops"] * r["num_processes"])
    return row


def _gib(value) -> str:
    return f"{value / 2**30:.2f}" if value else "-"


def table(rows: list[dict]) -> str:
    lines = ["| run | engine | throughput | step ms (median) | MFU | peak memory GiB (allocated / reserved) "
             "| wall s |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | - | **{r['error']}** | - | - | - | {r['seconds']:.0f} |")
            continue
        unit = f"{r['tokens_per_sec']:,.0f} tokens/s" if r["what"] == "tokens" else f"{r['samples_per_sec']:,.0f} images/s"
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "-"
        engine = f"{r['distributed_type']}, {r['mixed_precision']}" + (", compiled" if r["compile"] else "")
        lines.append(f"| {r['name']} | {engine} | **{unit}** | {r['step_ms_median']:.1f} | {mfu} | "
                     f"{_gib(r['max_memory_allocated'])} / {_gib(r['max_memory_reserved'])} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def markdown(rows: list[dict], header: str, note: str = "") -> str:
    return "\n".join(["## GPU throughput (one GPU)", "", header, "", *( [table(rows), ""] if rows else []),
                      *([note] if note else [])]).rstrip()


def main() -> int:
    if sys.argv[1:2] == ["_worker"]:
        worker(sys.argv[2], json.loads(sys.argv[3]), sys.argv[4])
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget", type=float, default=450, help="seconds for all runs together (default 450)")
    p.add_argument("--steps", type=int, default=150, help="optimizer steps per run (default 150)")
    p.add_argument("--warmup_steps", type=int, default=50, help="steps left out of the throughput (default 50)")
    p.add_argument("--smoke", action="store_true", help="run the plumbing on CPU with tiny models")
    p.add_argument("--markdown", default="", help="also write the section for bench/RESULTS.md here")
    a = p.parse_args()

    import torch

    command = "`python bench/gpu.py" + (" --smoke" if a.smoke else "") + "`"
    if not torch.cuda.is_available() and not a.smoke:
        why = ("no CUDA device is visible (torch " + torch.__version__ + ", torch.cuda.is_available() is False); "
               "nothing measured. Run `python bench/gpu.py` on a machine with a GPU.")
        print(f"bench/gpu.py: skipped: {why}")
        if a.markdown:
            Path(a.markdown).write_text(markdown([], f"{command}: skipped: {why}") + "\n")
        return 0
    if a.smoke:
        cases, steps, warmup = smoke_cases(min(a.steps, 12)), min(a.steps, 12), 2
    else:
        from launcher.config import DataConfig
        from launcher.tasks import data_root
        from launcher.tasks.cifar10 import find_source

        root = data_root(DataConfig())
        synthetic = find_source(root) is None and not Path(root, "cifar10").is_dir()
        cases, steps, warmup = gpu_cases(a.steps, synthetic), a.steps, a.warmup_steps
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU (smoke)"
    print(f"bench/gpu.py: {device}, {len(cases)} runs, budget {a.budget:.0f}s", flush=True)
    deadline = time.perf_counter() + a.budget
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as work:
        for case in cases:
            left = deadline - time.perf_counter()
            if left < 30:
                rows.append({"name": case.name, "error": "skipped: time budget spent", "seconds": 0})
                continue
            row = run_case(case, left, Path(work), warmup)
            rows.append(row)
            text = row.get("error") or (f"{row.get('tokens_per_sec', row['samples_per_sec']):,.0f} "
                                        f"{'tokens' if row['what'] == 'tokens' else 'images'}/s, "
                                        f"{row['distributed_type']}")
            print(f"  {case.name:<45} {text}  ({row['seconds']:.0f}s)", flush=True)
            if "error" in row and row.get("log"):
                print("    log tail:\n      " + "\n      ".join(Path(row["log"]).read_text(errors="replace")
                                                          .splitlines()[-8:]), flush=True)
    header = (f"{command} on {device}: {steps} optimizer steps per run, throughput over the steps after the "
              f"first {warmup}; one process each.")
    text = markdown(rows, header)
    print("\n" + text)
    if a.markdown:
        Path(a.markdown).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
