"""Overhead of the launcher against a minimal hand-written PyTorch loop doing the same work.

    python bench/overhead.py                                   # mnist1d + gpt_tiny, 1 and 2 processes, 5 reps
    python bench/overhead.py --workloads mnist1d --nprocs 1 --reps 3 --json out.json

Both sides train the same recipe (model, data, batch, AdamW with the recipe's weight decay and
gradient clipping, warmup + decay LR per step, same number of optimizer steps):

  launcher  the real `Trainer` in a fresh process (`accelerate launch --config_file
            accelerate_configs/cpu_ddp.yaml` for 2 processes), with every per-step behaviour on:
            one metrics.jsonl row per step (step, epoch, lr, loss averaged over ranks, grad norm),
            the non-finite / preemption agreement, Accelerate's prepared model, optimizer and loader.
            Evaluation is moved to the end (`train.eval_every_n_epochs` past the run; plateau off,
            since it needs evaluations) and checkpoints are off.
  plain     the loop below: batches indexed straight from the dataset with a seeded permutation,
            forward, backward, clip_grad_norm_, step, zero_grad, the LR set by hand; losses kept on
            the device and written as one JSON row per step every 25 steps (all-reduced like the
            launcher's); 2 processes: torchrun, gloo, DistributedDataParallel.

Time is measured from the start of the first optimizer step to the end of the last one (start-up
and the final evaluation are outside), in each run's rank 0. A and B alternate (ABAB..., then
BABA...) so that load drifting on a shared machine hits both; each pair gives a ratio
launcher/plain, and the table shows the median ratio and its range. Both sides run with
OMP_NUM_THREADS=1 (2 processes on 2 cores; 1-thread runs are steadier when the cores are shared).

On one process the two sides compute the same numbers: the per-step losses are compared and the
largest difference is reported (0 means identical training).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

WORKLOADS = {
    # name: (recipe, epochs for 1 process, epochs for 2 processes); about 1,000 mnist1d steps, 200 gpt steps
    "mnist1d": ("recipes/mnist1d.yaml", 8, 16),
    "gpt_tiny": ("recipes/gpt_tiny.yaml", 4, 8),
}
LOG_EVERY = 25


def _overrides(num_epochs: int) -> dict[str, str]:
    return {"train.num_epochs": str(num_epochs), "train.eval_every_n_epochs": "1000000",
            "schedule.plateau.enabled": "false", "checkpoint.enabled": "false", "train.progress_bar": "off",
            "train.mixed_precision": "no", "tracking.wandb.enabled": "false"}


# ---------------------------------------------------------------------------------------------
# Workers: one measured run each, in its own process(es)
# ---------------------------------------------------------------------------------------------


def run_launcher(recipe: str, num_epochs: int, run_dir: str, out: str) -> None:
    from launcher.config import load_config
    from launcher.distributed import make_accelerator
    from launcher.trainer import Trainer

    cfg = load_config(recipe, _overrides(num_epochs))
    accelerator = make_accelerator(cfg.train, cfg.optim.clip_grad_norm)
    if accelerator.is_main_process:
        os.makedirs(run_dir, exist_ok=True)
    trainer = Trainer(cfg, run_dir, accelerator)
    stamps: list[float] = []  # the start of every optimizer step (accumulation is 1 here), then the end
    step = trainer.train_step

    def timed_step(batch):
        stamps.append(time.perf_counter())
        return step(batch)

    trainer.train_step = timed_step
    original_flush = trainer._flush
    end = 0.0

    def flush_at_end():
        nonlocal end
        original_flush()
        if trainer.state.step == trainer.plan.total_steps and not end:
            end = time.perf_counter()  # the last step and its rows are done; the final evaluation comes next

    trainer._flush = flush_at_end
    try:
        trainer.train()
    finally:
        trainer.close()
    if accelerator.is_main_process:
        rows = [json.loads(line) for line in Path(run_dir, "metrics.jsonl").read_text().splitlines()]
        losses = [r["train/loss"] for r in rows if "train/loss" in r]
        _write(out, "launcher", [*stamps, end], losses)


def run_plain(recipe: str, num_epochs: int, out: str) -> None:
    import numpy as np
    import torch
    import torch.distributed as dist

    from launcher.config import load_config
    from launcher.plan import make_plan
    from launcher.schedule import scheduled_lr
    from launcher.tasks import build_task

    cfg = load_config(recipe, _overrides(num_epochs))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        dist.init_process_group("gloo")
    random.seed(cfg.train.seed)
    np.random.seed(cfg.train.seed)
    torch.manual_seed(cfg.train.seed)
    task = build_task(cfg.task, cfg.data)
    plan = make_plan(cfg, world, len(task.train_set))
    model = task.model
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    o = cfg.optim
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if o.name == "adam":
        opt = torch.optim.Adam(groups, lr=plan.base_lr, betas=o.betas, eps=o.eps)
    else:
        opt = torch.optim.AdamW(groups, lr=plan.base_lr, betas=o.betas, eps=o.eps)
    max_norm = o.clip_grad_norm or math.inf
    batch, global_batch = plan.per_device_batch, plan.global_batch

    def lr_at(k: int) -> float:
        return scheduled_lr(k, plan.base_lr, cfg.schedule, plan.warmup_steps, plan.steps_per_epoch, plan.total_steps)

    log_path = Path(out).parent / f"plain-rank{rank}.jsonl"
    log = log_path.open("w")
    pending: list[tuple[int, float, torch.Tensor]] = []

    def flush() -> None:
        if not pending:
            return
        losses = torch.stack([p[2] for p in pending])
        if world > 1:
            dist.all_reduce(losses)
            losses /= world
        if rank == 0:
            log.writelines(json.dumps({"step": s, "lr": lr, "train/loss": v}) + "\n"
                           for (s, lr, _), v in zip(pending, losses.tolist()))
            log.flush()
        pending.clear()

    all_losses: list[float] = []
    k, stamps = 0, []
    model.train()
    for epoch in range(plan.num_epochs):
        g = torch.Generator()
        g.manual_seed(cfg.train.seed * 1_000_003 + epoch)
        order = torch.randperm(len(task.train_set), generator=g)
        for i in range(plan.steps_per_epoch):
            if k >= plan.total_steps:
                break
            first = i * global_batch + rank * batch
            inputs, targets = task.split(task.train_set.__getitems__(order[first:first + batch]))
            stamps.append(time.perf_counter())
            k += 1
            lr = lr_at(k)
            for group in opt.param_groups:
                group["lr"] = lr
            loss = task.loss(model(inputs), targets)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, max_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            pending.append((k, lr, loss.detach()))
            if k % LOG_EVERY == 0:
                flush()
        flush()
    stamps.append(time.perf_counter())
    log.close()
    if rank == 0:
        all_losses = [json.loads(line)["train/loss"] for line in log_path.read_text().splitlines()]
        _write(out, "plain", stamps, all_losses)
    if world > 1:
        dist.destroy_process_group()


def _write(out: str, impl: str, stamps: list[float], losses: list[float]) -> None:
    steps = len(stamps) - 1
    with open(out, "w") as f:
        json.dump({"impl": impl, "steps": steps, "seconds": stamps[-1] - stamps[0],
                   "steps_per_sec": steps / (stamps[-1] - stamps[0]),
                   "step_seconds": [b - a for a, b in zip(stamps, stamps[1:])], "losses": losses}, f)


# ---------------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------------


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)}


def measure(impl: str, workload: str, nproc: int, work: Path) -> dict:
    recipe, epochs1, epochs2 = WORKLOADS[workload]
    epochs = epochs1 if nproc == 1 else epochs2
    run = Path(tempfile.mkdtemp(prefix=f"{impl}-", dir=work))
    out = run / "result.json"
    script = str(Path(__file__).resolve())
    worker = [script, "_worker", "--impl", impl, "--recipe", recipe, "--epochs", str(epochs),
              "--run_dir", str(run / "run"), "--out", str(out)]
    if nproc == 1:
        cmd = [sys.executable, *worker]
    elif impl == "launcher":
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "accelerate_configs/cpu_ddp.yaml",
               "--num_processes", str(nproc), *worker]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *worker]
    log = run / "log.txt"
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=REPO, env=_env(), stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0 or not out.exists():
        tail = "\n".join(log.read_text().splitlines()[-15:])
        raise RuntimeError(f"{' '.join(cmd)} failed (status {proc.returncode}):\n{tail}")
    return json.loads(out.read_text())


def _min_per_step(runs: list[dict]) -> float:
    """Seconds for the whole run if every step went as fast as its fastest repetition.

    Step i does the same work in every repetition (the same flushes and epoch ends at the same
    steps), so the minimum over repetitions strips the time other processes took from this one.
    """
    return sum(min(steps) for steps in zip(*(r["step_seconds"] for r in runs)))


def compare(workloads: list[str], nprocs: list[int], reps: int, work: Path) -> list[dict]:
    results = []
    for workload in workloads:
        for nproc in nprocs:
            pairs: list[tuple[dict, dict]] = []
            for rep in range(reps):
                order = ["launcher", "plain"] if rep % 2 == 0 else ["plain", "launcher"]
                got = {impl: measure(impl, workload, nproc, work) for impl in order}
                a, b = got["launcher"], got["plain"]
                pairs.append((a, b))
                print(f"{workload} {nproc}p pair {rep + 1}/{reps}: launcher {a['steps_per_sec']:.1f} steps/s, "
                      f"plain {b['steps_per_sec']:.1f}, ratio {a['steps_per_sec'] / b['steps_per_sec']:.3f}", flush=True)
            launcher, plain = [a for a, _ in pairs], [b for _, b in pairs]
            ratios = [a["steps_per_sec"] / b["steps_per_sec"] for a, b in pairs]
            steps = launcher[0]["steps"]
            best_launcher, best_plain = _min_per_step(launcher), _min_per_step(plain)
            results.append({
                "workload": workload, "recipe": WORKLOADS[workload][0], "nproc": nproc, "reps": reps,
                "steps": steps, "plain_steps": plain[0]["steps"],
                "launcher_steps_per_sec": statistics.median(r["steps_per_sec"] for r in launcher),
                "plain_steps_per_sec": statistics.median(r["steps_per_sec"] for r in plain),
                "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
                "ratios": ratios,
                "launcher_steps_per_sec_min_per_step": steps / best_launcher,
                "plain_steps_per_sec_min_per_step": steps / best_plain,
                "ratio_min_per_step": best_plain / best_launcher,
                "max_loss_diff": max(max((abs(x - y) for x, y in zip(a["losses"], b["losses"])), default=math.nan)
                                     for a, b in pairs),
            })
    return results


def table(results: list[dict]) -> str:
    lines = ["| workload | processes | steps | launcher steps/s | plain steps/s | launcher/plain: median of pairs "
             "(range) | per-step minimum: launcher, plain steps/s | launcher/plain: per-step minimum | same losses |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        same = "identical" if r["max_loss_diff"] == 0 else f"max diff {r['max_loss_diff']:.2g}"
        lines.append(f"| {r['workload']} | {r['nproc']} | {r['steps']} | "
                     f"{r['launcher_steps_per_sec']:.1f} | {r['plain_steps_per_sec']:.1f} | "
                     f"{r['ratio_median']:.3f} ({r['ratio_min']:.3f}-{r['ratio_max']:.3f}, {r['reps']} pairs) | "
                     f"{r['launcher_steps_per_sec_min_per_step']:.1f}, {r['plain_steps_per_sec_min_per_step']:.1f} | "
                     f"**{r['ratio_min_per_step']:.3f}** | {same} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_worker"]:
        p = argparse.ArgumentParser()
        p.add_argument("--impl", choices=["launcher", "plain"])
        p.add_argument("--recipe")
        p.add_argument("--epochs", type=int)
        p.add_argument("--run_dir")
        p.add_argument("--out")
        a = p.parse_args(argv[1:])
        if a.impl == "launcher":
            run_launcher(a.recipe, a.epochs, a.run_dir, a.out)
        else:
            os.makedirs(os.path.dirname(a.out), exist_ok=True)
            run_plain(a.recipe, a.epochs, a.out)
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", default="mnist1d,gpt_tiny", help="comma-separated: " + ", ".join(WORKLOADS))
    p.add_argument("--nprocs", default="1,2", help="comma-separated process counts")
    p.add_argument("--reps", type=int, default=5, help="A/B pairs per workload and process count")
    p.add_argument("--json", default="", help="also write the results here")
    a = p.parse_args(argv)
    workloads = [w for w in a.workloads.split(",") if w]
    unknown = [w for w in workloads if w not in WORKLOADS]
    if unknown:
        p.error(f"unknown workload(s) {unknown}; choose from {', '.join(WORKLOADS)}")
    with tempfile.TemporaryDirectory(prefix="bench-overhead-") as work:
        results = compare(workloads, [int(n) for n in a.nprocs.split(",")], a.reps, Path(work))
    print(table(results))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
