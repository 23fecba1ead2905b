"""GPU check: the precision and sharding paths that a CPU machine cannot run, a few steps each.

    python bench/gpu_check.py                 # all cases, one GPU, a few minutes; prints a pass/fail table
    python bench/gpu_check.py --only fsdp2    # one case (names in the table)
    python bench/gpu_check.py --keep DIR      # keep run directories and logs under DIR

Each case is a real `accelerate launch` with one of accelerate_configs/*.yaml on ONE GPU (1 process),
a small recipe for ~1-2 epochs, then checks of what the run wrote: the topology line (device cuda,
the precision and engine asked for), finite train/loss that goes down, for fp16 that a gradient
overflow is skipped by the scaler while the LR keeps following the schedule (one step counter), and
for `sync-free` that steady-state steps run under `torch.cuda.set_sync_debug_mode("error")` (any
host sync between two flushes fails the run; `SyncDebug` below, loaded as a launcher hook).
Exit status 0 when every case passes, 1 otherwise. tests/gpu/test_gpu.py runs the same cases.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch"]
MNIST = ["--recipe", "recipes/mnist1d.yaml", "--task.options.num_train=1280", "--task.options.num_test=256",
         "--train.batch_size=64", "--train.num_epochs=2", "--checkpoint.enabled=false", "--train.progress_bar=off"]
GPT = ["--recipe", "recipes/gpt_tiny.yaml", "--task.options.max_bytes=2000000", "--task.options.samples_per_epoch=640",
       "--task.options.val_samples=64", "--train.batch_size=32", "--train.num_epochs=2", "--checkpoint.enabled=false",
       "--train.progress_bar=off", "--train.compile=false"]
OVERFLOW_STEP = 3
"""The fp16 case multiplies the loss of this optimizer step by 1e8: its fp16 gradients overflow."""


@dataclass
class Case:
    name: str
    launch: list[str]
    """accelerate launch options (config file, precision)."""
    train: list[str]
    """launcher.train options."""
    expect: list[str]
    """Lines (substrings) the run must print."""
    extra_check: Callable[[list[dict]], str | None] | None = None
    env: dict[str, str] = field(default_factory=dict)


def _lr_follows_schedule_through_overflow(rows: list[dict]) -> str | None:
    """A skipped update still advances the schedule: the warmup LR keeps rising through the overflow step."""
    lrs = [r["lr"] for r in rows]
    k = OVERFLOW_STEP - 1  # rows are 1-based steps
    if not (lrs[k - 1] < lrs[k] < lrs[k + 1] < lrs[k + 2]):
        return f"warmup lr should rise through the skipped step: {lrs[: k + 3]}"
    return None


def _sync_free(rows: list[dict]) -> str | None:
    return None if rows else "no step rows"


class SyncDebug:
    """Launcher hook: steady-state steps under torch.cuda.set_sync_debug_mode("error").

    The mode is switched on after a step whose end brings no flush (every train.log_every_n_steps steps,
    a step checkpoint, an epoch's last step), so the next step, `after_step` included, must not sync; it
    is switched off before a flush, an evaluation or a checkpoint, where reading back is the point.
    """

    def __init__(self):
        self.checked = 0

    def after_step(self, trainer) -> None:
        import torch

        s, plan, every = trainer.state, trainer.plan, trainer.cfg.train.log_every_n_steps
        flush_next = (s.step % every == 0 or s.step_in_epoch >= plan.steps_per_epoch or s.step >= plan.total_steps
                      or trainer.checkpoints.due(s.step, s.step_in_epoch, plan.steps_per_epoch, plan.total_steps))
        if torch.cuda.get_sync_debug_mode() and s.step > 2:
            self.checked += 1  # this step ran in "error" mode without a sync
        torch.cuda.set_sync_debug_mode(0 if flush_next or s.step < 2 else "error")

    def on_finish(self, trainer, summary) -> None:
        import torch

        torch.cuda.set_sync_debug_mode(0)
        if not self.checked:
            raise RuntimeError("sync debug: no steady-state step was checked")
        if trainer.is_main:
            print(f"sync debug: {self.checked} steps ran without a host sync", flush=True)


CASES = [
    Case("bf16", ["--config_file", "accelerate_configs/single_gpu.yaml", "--mixed_precision", "bf16"], MNIST,
         ["topology: NO, 1 process(es) on 1 machine(s), device cuda", "mixed precision bf16"]),
    Case("fp16-scaler", ["--config_file", "accelerate_configs/single_gpu.yaml", "--mixed_precision", "fp16"],
         [*MNIST, "--task.name=gpu_check:overflow_task", "--schedule.warmup_epochs=1"],
         ["topology: NO, 1 process(es) on 1 machine(s), device cuda", "mixed precision fp16"],
         _lr_follows_schedule_through_overflow, env={"PYTHONPATH": str(BENCH)}),
    Case("sync-free", ["--config_file", "accelerate_configs/single_gpu.yaml", "--mixed_precision", "bf16"],
         [*MNIST, "--data.pin_memory=true"], ["device cuda", "steps ran without a host sync"], _sync_free,
         env={"PYTHONPATH": str(BENCH), "LAUNCHER_HOOKS": "gpu_check:SyncDebug"}),
    Case("fsdp2", ["--config_file", "accelerate_configs/fsdp.yaml", "--num_processes", "1"], MNIST,
         ["topology: FSDP, 1 process(es) on 1 machine(s), device cuda", "mixed precision bf16", "fsdp: version 2"]),
    Case("fsdp2-gpt-blocks", ["--config_file", "accelerate_configs/fsdp.yaml", "--num_processes", "1",
                              "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",
                              "--fsdp_transformer_layer_cls_to_wrap", "Block"], GPT,
         ["topology: FSDP, 1 process(es)", "fsdp: version 2", "transformer_auto_wrap_policy"]),
    Case("zero3-bf16", ["--config_file", "accelerate_configs/deepspeed_zero3.yaml", "--num_processes", "1",
                        "--mixed_precision", "bf16"], MNIST,
         ["topology: DEEPSPEED, 1 process(es) on 1 machine(s), device cuda", "mixed precision bf16",
          "deepspeed: ZeRO stage 3"]),
    Case("zero2-fp16", ["--config_file", "accelerate_configs/deepspeed_zero2.yaml", "--num_processes", "1",
                        "--mixed_precision", "fp16"], MNIST,
         ["topology: DEEPSPEED, 1 process(es) on 1 machine(s), device cuda", "mixed precision fp16",
          "deepspeed: ZeRO stage 2"]),
]


def overflow_task(task_cfg, data_cfg):
    """MNIST-1D whose loss is multiplied by 1e8 at optimizer step OVERFLOW_STEP (finite in fp32, inf in fp16 grads)."""
    from launcher.tasks import build_task

    task = build_task(type(task_cfg)(name="mnist1d", model=task_cfg.model, options=task_cfg.options), data_cfg)
    base_loss, calls = task.loss, [0]

    def loss(outputs, targets):
        calls[0] += 1
        value = base_loss(outputs, targets)
        return value * 1e8 if calls[0] == OVERFLOW_STEP else value

    task.loss = loss
    return task


def run_case(case: Case, work: Path, timeout: int = 300) -> tuple[bool, str, float]:
    """Run one case; returns (passed, detail, seconds)."""
    run_dir = work / case.name
    env = dict(os.environ, PYTHONUNBUFFERED="1", WANDB_MODE="disabled")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), case.env.get("PYTHONPATH"), env.get("PYTHONPATH")) if p)
    env.update({k: v for k, v in case.env.items() if k != "PYTHONPATH"})
    cmd = [*ACCELERATE, *case.launch, "-m", "launcher.train", *case.train, "--output_dir", str(run_dir)]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        (work / f"{case.name}.log").write_text(out)
        return False, f"timed out after {timeout}s", time.perf_counter() - start
    seconds = time.perf_counter() - start
    (work / f"{case.name}.log").write_text(" ".join(cmd) + "\n\n" + out)
    if proc.returncode != 0:
        tail = [line for line in out.strip().splitlines() if line.strip()][-1:] or ["(no output)"]
        return False, f"exit {proc.returncode}: {tail[0][:160]}", seconds
    missing = [e for e in case.expect if e not in out]
    if missing:
        return False, f"output lacks {missing[0]!r}", seconds
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "train/loss" in r]
    losses = [r["train/loss"] for r in train]
    if not losses or not all(isinstance(x, float) and math.isfinite(x) for x in losses):
        return False, "train/loss missing or not finite", seconds
    n = max(1, len(losses) // 5)
    head = sorted(losses[:n])[n // 2]
    tail = sorted(losses[-n:])[n // 2]
    if not tail < head:
        return False, f"train/loss did not go down ({head:.4f} -> {tail:.4f})", seconds
    problem = case.extra_check(train) if case.extra_check else None
    if problem:
        return False, problem, seconds
    evals = [r for r in rows if "val/loss" in r]
    last = evals[-1] if evals else {}
    detail = f"{len(train)} steps, loss {head:.3f} -> {tail:.3f}" + (
        f", val/loss {last['val/loss']:.3f}" if "val/loss" in last else "")
    return True, detail, seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="cases: " + ", ".join(c.name for c in CASES))
    parser.add_argument("--only", action="append", choices=[c.name for c in CASES], help="run only this case (repeatable)")
    parser.add_argument("--keep", metavar="DIR", help="write run directories and logs here and keep them")
    parser.add_argument("--timeout", type=int, default=300, help="seconds per case (default 300)")
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible; nothing to check", file=sys.stderr)
        return 2
    print(f"gpu_check: {torch.cuda.get_device_name(0)}, torch {torch.__version__}", flush=True)
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="gpu_check-"))
    work.mkdir(parents=True, exist_ok=True)
    results = []
    for case in CASES:
        if args.only and case.name not in args.only:
            continue
        ok, detail, seconds = run_case(case, work, args.timeout)
        results.append((case.name, ok, seconds, detail))
        print(f"  {case.name:<18} {'PASS' if ok else 'FAIL'}  {seconds:6.1f}s  {detail}", flush=True)
    width = max(len(r[0]) for r in results)
    print(f"\n{'case':<{width}}  result  seconds  detail")
    for name, ok, seconds, detail in results:
        print(f"{name:<{width}}  {'PASS' if ok else 'FAIL':<6}  {seconds:7.1f}  {detail}")
    failed = [r[0] for r in results if not r[1]]
    print(f"\n{len(results) - len(failed)}/{len(results)} passed" + (f"; logs in {work}" if failed or args.keep else ""))
    if not failed and not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
