"""Overhead of the launcher against a minimal hand-written PyTorch loop doing the same work.

    python bench/overhead.py                                   # mnist1d + gpt_tiny, 1 and 2 processes
    python bench/overhead.py --workloads mnist1d --nprocs 1 --reps 3 --json out.json
    python bench/overhead.py --mode separate                   # each side in its own processes instead

Both sides train the same recipe: model, data, batch, AdamW with the recipe's weight decay (not on
biases) and gradient clipping, the recipe's warmup + decay LR set every step, the same number of
optimizer steps.

  launcher  the real `Trainer` with every per-step behaviour on: one metrics.jsonl row per step
            (step, epoch, lr, loss averaged over ranks, grad norm), the device-side non-finite skip,
            preemption agreed at the flush, Accelerate's prepared model, optimizer and data loader,
            the progress-bar hook (off). Evaluation is moved to
            the end (`train.eval_every_n_epochs` past the run; plateau off, as it needs evaluations)
            and checkpoints are off. 2 processes: `accelerate launch --config_file
            accelerate_configs/cpu_ddp.yaml`.
  plain     `PlainLoop` below: batches indexed straight from the dataset with the same seeded
            permutation, forward, backward, clip_grad_norm_, step, zero_grad; losses kept on the
            device and written as one JSON row per step every 25 steps (averaged over ranks, like
            the launcher's); 2 processes: gloo DistributedDataParallel.

Modes (both: time from the start of the first optimizer step to the end of the last one, start-up
and the final evaluation outside; rank 0's clock; OMP_NUM_THREADS=1 so 2 processes fit 2 cores):

  interleaved (default)  one run per repetition holds both: the plain loop does its own step
            (timed apart) before each even launcher step and right after each odd one (so the cost
            of going second, with caches the other side just used, falls on both alike), once the launcher's metrics writer thread has
            finished what it was handed (that wait is launcher time: a conservative charge, as the
            thread would overlap the launcher's next step). Load from other processes on a shared machine
            then falls on both sides alike, step by step; the ratio is that of the summed step times.
  separate  A and B in their own processes (plain: `torchrun` for 2), alternating ABAB.. then
            BABA..; each pair gives a ratio of wall times, and the table shows the median and range.
            The per-step minimum over repetitions (step i does the same work in every repetition)
            gives a second, load-stripped estimate. Only trustworthy on a quiet machine.

The two sides compute the same numbers, on 1 and on 2 processes: the per-step losses are compared
and the largest difference is reported (0: identical training). gpt's windows come from its own
counter-based generator (launcher.data.SampleRandom, keyed by seed, epoch and sample) on both sides.

Syncs: one more launcher run per case (not timed) counts the host reads (`Tensor.item`, `tolist`,
`__bool__`, `__float__`, `__int__` called from Python) and Python-level `torch.distributed` calls per
optimizer step (bench/sync_count.py, loaded as a hook), and `--count_run` adds a whole 2-process
`recipes/mnist1d_fast.yaml` run with its evaluations and checkpoints (target: at most 0.3 a step).
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
    # name: (recipe, epochs for 1 process, epochs for 2 processes): ~1,000 mnist1d steps, 50 gpt_tiny steps
    "mnist1d": ("recipes/mnist1d.yaml", 8, 16),
    "gpt_tiny": ("recipes/gpt_tiny.yaml", 1, 2),
}
LOG_EVERY = 25


def _overrides(num_epochs: int) -> dict[str, str]:
    return {"train.num_epochs": str(num_epochs), "train.eval_every_n_epochs": "1000000",
            "schedule.plateau.enabled": "false", "checkpoint.enabled": "false", "train.progress_bar": "off",
            "train.mixed_precision": "no", "tracking.wandb.enabled": "false"}


# ---------------------------------------------------------------------------------------------
# The plain loop
# ---------------------------------------------------------------------------------------------


class PlainLoop:
    """A minimal training loop on the recipe's task, one optimizer step per `step()` call."""

    def __init__(self, cfg, log_path: Path):
        import numpy as np
        import torch
        import torch.distributed as dist

        from launcher.plan import make_plan
        from launcher.tasks import build_task

        self.torch, self.dist, self.cfg = torch, dist, cfg
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        random.seed(cfg.train.seed)
        np.random.seed(cfg.train.seed)
        torch.manual_seed(cfg.train.seed)
        self.task = build_task(cfg.task, cfg.data)
        self.plan = plan = make_plan(cfg, self.world, len(self.task.train_set))
        model = self.task.model
        self.model = torch.nn.parallel.DistributedDataParallel(model) if self.world > 1 else model
        self.params = [p for p in model.parameters() if p.requires_grad]
        o = cfg.optim
        groups = [{"params": [p for p in self.params if p.ndim >= 2], "weight_decay": o.weight_decay},
                  {"params": [p for p in self.params if p.ndim < 2], "weight_decay": 0.0}]
        optimizer = torch.optim.Adam if o.name == "adam" else torch.optim.AdamW
        # The same kernel as the launcher's (launcher.optim: fused on CPU and CUDA unless optim.fused is off).
        self.optimizer = optimizer(groups, lr=plan.base_lr, betas=o.betas, eps=o.eps, fused=o.fused or None)
        self.max_norm = o.clip_grad_norm or math.inf
        self.k = 0
        self.order = None
        self.pending: list[tuple[int, float, object]] = []
        self.log = log_path.open("w")
        self.model.train()

    def lr_at(self, k: int) -> float:
        from launcher.schedule import scheduled_lr

        p = self.plan
        return scheduled_lr(k, p.base_lr, self.cfg.schedule, p.warmup_steps, p.steps_per_epoch, p.total_steps)

    def next_batch(self):
        from launcher.data import sample_random_of

        epoch, i = divmod(self.k, self.plan.steps_per_epoch)
        if i == 0:
            g = self.torch.Generator()
            g.manual_seed(self.cfg.train.seed * 1_000_003 + epoch)
            self.order = self.torch.randperm(len(self.task.train_set), generator=g)
            rng = sample_random_of(self.task.train_set)
            if rng is not None:  # gpt's windows: a function of (seed, epoch, sample), as the launcher's sampler sets
                rng.set_epoch(self.cfg.train.seed, epoch)
        first = i * self.plan.global_batch + self.rank * self.plan.per_device_batch
        return self.task.split(self.task.train_set.__getitems__(self.order[first:first + self.plan.per_device_batch]))

    def step(self, inputs, targets) -> None:
        self.k += 1
        lr = self.lr_at(self.k)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss = self.task.loss(self.model(inputs), targets)
        loss.backward()
        self.torch.nn.utils.clip_grad_norm_(self.params, self.max_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.pending.append((self.k, lr, loss.detach()))
        if self.k % LOG_EVERY == 0 or self.k % self.plan.steps_per_epoch == 0:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        losses = self.torch.stack([p[2] for p in self.pending])
        if self.world > 1:
            self.dist.all_reduce(losses)
            losses /= self.world
        if self.rank == 0:
            self.log.writelines(json.dumps({"step": k, "lr": lr, "train/loss": v}) + "\n"
                                for (k, lr, _), v in zip(self.pending, losses.tolist()))
            self.log.flush()
        self.pending.clear()

    def close(self) -> list[float]:
        self.flush()
        self.log.close()
        return [json.loads(line)["train/loss"] for line in Path(self.log.name).read_text().splitlines()]


# ---------------------------------------------------------------------------------------------
# Workers: one measured run, in its own process(es)
# ---------------------------------------------------------------------------------------------


def run_launcher(recipe: str, num_epochs: int, run_dir: str, out: str, interleave: bool) -> None:
    """The Trainer, timed per step; with `interleave`, a PlainLoop step (timed apart) next to each of its steps."""
    from launcher.config import load_config
    from launcher.distributed import make_accelerator
    from launcher.trainer import Trainer

    cfg = load_config(recipe, _overrides(num_epochs))
    accelerator = make_accelerator(cfg.train, cfg.optim.clip_grad_norm)
    if accelerator.is_main_process:
        os.makedirs(run_dir, exist_ok=True)
    trainer = Trainer(cfg, run_dir, accelerator)
    plain = PlainLoop(cfg, Path(out).with_suffix(f".plain{accelerator.process_index}.jsonl")) if interleave else None
    launcher_stamps: list[float] = []  # the start of every launcher step (accumulation is 1 here)
    launcher_seconds: list[float] = []
    plain_seconds: list[float] = []
    inside = [0.0]  # plain time inside the current launcher interval (to take out of it)
    step = trainer.train_step

    def plain_step() -> float:
        start = time.perf_counter()
        plain.step(*plain.next_batch())
        plain_seconds.append(time.perf_counter() - start)
        return plain_seconds[-1]

    def timed_step(batch):
        # The plain step goes before the launcher's on even steps and right after it on odd ones, so
        # whatever going second costs (caches the other side just used) falls on both sides alike.
        if plain is not None:
            # The metrics writer thread's work is the launcher's: let it finish (on the launcher's clock)
            # before the plain step, which it would otherwise slow down instead.
            trainer.tracker.flush()
        now = time.perf_counter()
        if launcher_stamps:  # the previous launcher step, its bookkeeping and the fetch of this batch
            launcher_seconds.append(now - launcher_stamps[-1] - inside[0])
        inside[0] = 0.0
        second = plain is not None and len(launcher_stamps) % 2 == 1
        if plain is not None and not second:
            plain_step()
        launcher_stamps.append(time.perf_counter())
        result = step(batch)
        if second:
            inside[0] = plain_step()
        return result

    trainer.train_step = timed_step
    original_flush = trainer._flush
    end = [0.0]

    def flush_at_end():
        result = original_flush()
        if trainer.state.step == trainer.plan.total_steps and not end[0]:
            end[0] = time.perf_counter()  # the last step and its rows are done; the final evaluation comes next
        return result

    trainer._flush = flush_at_end
    try:
        trainer.train()
        plain_losses = plain.close() if plain is not None else []
    finally:
        trainer.close()
    launcher_seconds.append(end[0] - launcher_stamps[-1] - inside[0])
    if accelerator.is_main_process:
        rows = [json.loads(line) for line in Path(run_dir, "metrics.jsonl").read_text().splitlines()]
        losses = [r["train/loss"] for r in rows if "train/loss" in r]
        result = {"launcher": _summary(launcher_seconds, losses)}
        if plain is not None:
            result["plain"] = _summary(plain_seconds, plain_losses)
        Path(out).write_text(json.dumps(result))


def run_plain(recipe: str, num_epochs: int, out: str) -> None:
    import torch.distributed as dist

    from launcher.config import load_config

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo")
    cfg = load_config(recipe, _overrides(num_epochs))
    loop = PlainLoop(cfg, Path(out).with_suffix(f".plain{os.environ.get('RANK', '0')}.jsonl"))
    stamps = []
    for _ in range(loop.plan.total_steps):
        inputs, targets = loop.next_batch()
        stamps.append(time.perf_counter())
        loop.step(inputs, targets)
    loop.flush()
    stamps.append(time.perf_counter())
    losses = loop.close()
    if loop.rank == 0:
        Path(out).write_text(json.dumps({"plain": _summary([b - a for a, b in zip(stamps, stamps[1:])], losses)}))
    if dist.is_initialized():
        dist.destroy_process_group()


def _summary(step_seconds: list[float], losses: list[float]) -> dict:
    total = sum(step_seconds)
    return {"steps": len(step_seconds), "seconds": total, "steps_per_sec": len(step_seconds) / total,
            "step_seconds": step_seconds, "losses": losses}


# ---------------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------------


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)}


def measure(impl: str, workload: str, nproc: int, work: Path) -> dict:
    """One run of `impl` (launcher, plain or interleaved) in fresh processes; rank 0's result."""
    recipe, epochs1, epochs2 = WORKLOADS[workload]
    run = Path(tempfile.mkdtemp(prefix=f"{impl}-", dir=work))
    out = run / "result.json"
    worker = [str(Path(__file__).resolve()), "_worker", "--impl", impl, "--recipe", recipe,
              "--epochs", str(epochs1 if nproc == 1 else epochs2), "--run_dir", str(run / "run"), "--out", str(out)]
    if nproc == 1:
        cmd = [sys.executable, *worker]
    elif impl == "plain":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *worker]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "accelerate_configs/cpu_ddp.yaml",
               "--num_processes", str(nproc), *worker]
    log = run / "log.txt"
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=REPO, env=_env(), stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0 or not out.exists():
        tail = "\n".join(log.read_text().splitlines()[-15:])
        raise RuntimeError(f"{' '.join(cmd)} failed (status {proc.returncode}):\n{tail}")
    return json.loads(out.read_text())


def _min_per_step(runs: list[dict]) -> float:
    """Seconds for the whole run if every step went as fast as in its fastest repetition.

    Step i does the same work in every repetition (the same flushes and epoch ends at the same
    steps), so the minimum over repetitions strips most of the time other processes took.
    """
    return sum(min(steps) for steps in zip(*(r["step_seconds"] for r in runs)))


def _loss_diff(a: dict, b: dict) -> float:
    return max((abs(x - y) for x, y in zip(a["losses"], b["losses"])), default=math.nan)


def _pairs(workload: str, nproc: int, reps: int, mode: str, work: Path) -> list[tuple[dict, dict]]:
    pairs = []
    for rep in range(reps):
        if mode == "interleaved":
            got = measure("interleaved", workload, nproc, work)
        else:
            order = ["launcher", "plain"] if rep % 2 == 0 else ["plain", "launcher"]
            got = {impl: measure(impl, workload, nproc, work)[impl] for impl in order}
        a, b = got["launcher"], got["plain"]
        pairs.append((a, b))
        print(f"{workload} {nproc}p {rep + 1}/{reps}: launcher "
              f"{a['steps_per_sec']:.1f} steps/s, plain {b['steps_per_sec']:.1f}, "
              f"ratio {a['steps_per_sec'] / b['steps_per_sec']:.3f}", flush=True)
    return pairs


def count_syncs(recipe: str, nproc: int, work: Path, overrides: list[str]) -> dict:
    """Host reads and Python-level collectives per optimizer step of one launcher run (bench/sync_count.py)."""
    run = Path(tempfile.mkdtemp(prefix="count-", dir=work))
    train = ["-m", "launcher.train", "--recipe", recipe, "--output_dir", str(run / "run"), *overrides]
    cmd = [sys.executable, *train] if nproc == 1 else [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", "accelerate_configs/cpu_ddp.yaml",
        "--num_processes", str(nproc), *train]
    env = {**_env(), "LAUNCHER_HOOKS": "sync_count:SyncCounter", "SYNC_COUNT_DIR": str(run / "counts"),
           "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "bench")])}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (status {proc.returncode}):\n{proc.stderr[-2000:]}")
    ranks = [json.loads((run / "counts" / f"rank{r}.json").read_text()) for r in range(nproc)]
    worst = max(ranks, key=lambda c: c["host_reads"] + c["collectives"])
    steps = worst["optimizer_steps"]
    return {"recipe": recipe, "nproc": nproc, "steps": steps, "host_reads": worst["host_reads"],
            "collectives": worst["collectives"], "per_step": (worst["host_reads"] + worst["collectives"]) / steps,
            "by_call": {**worst["reads_by_call"], **worst["collectives_by_call"]}}


def compare(workloads: list[str], nprocs: list[int], reps: int, mode: str, work: Path,
            count: bool = True) -> list[dict]:
    results = []
    for workload in workloads:
        for nproc in nprocs:
            pairs = _pairs(workload, nproc, reps, mode, work)
            launcher, plain = [a for a, _ in pairs], [b for _, b in pairs]
            ratios = [a["steps_per_sec"] / b["steps_per_sec"] for a, b in pairs]
            steps = launcher[0]["steps"]
            row = {"workload": workload, "recipe": WORKLOADS[workload][0], "nproc": nproc, "reps": reps, "mode": mode,
                   "steps": steps, "plain_steps": plain[0]["steps"],
                   "launcher_steps_per_sec": steps / _min_per_step(launcher),
                   "plain_steps_per_sec": steps / _min_per_step(plain),
                   "ratio_min_per_step": _min_per_step(plain) / _min_per_step(launcher),
                   "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
                   "ratios": ratios, "max_loss_diff": max(_loss_diff(a, b) for a, b in pairs)}
            if count:
                recipe, epochs1, epochs2 = WORKLOADS[workload]
                overrides = [f"--{k}={v}" for k, v in _overrides(epochs1 if nproc == 1 else epochs2).items()]
                row["syncs"] = count_syncs(recipe, nproc, work, overrides)
            results.append(row)
    return results


def _syncs_cell(c: dict | None) -> str:
    if not c:
        return "-"
    return f"{c['per_step']:.3f} ({c['host_reads']} reads + {c['collectives']} collectives / {c['steps']} steps)"


def table(results: list[dict]) -> str:
    lines = ["| workload | processes | steps | launcher steps/s | plain steps/s | **launcher/plain** "
             "| launcher/plain per run: median (range) | host reads + collectives per step | losses |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        same = "identical" if r["max_loss_diff"] == 0 else f"differ (max {r['max_loss_diff']:.2g})"
        extra = _syncs_cell(r.get("syncs")) + " | "
        lines.append(f"| {r['workload']} | {r['nproc']} | {r['steps']} | {r['launcher_steps_per_sec']:.1f} | "
                     f"{r['plain_steps_per_sec']:.1f} | **{r['ratio_min_per_step']:.3f}** | {r['ratio_median']:.3f} "
                     f"({r['ratio_min']:.3f}-{r['ratio_max']:.3f}, {r['reps']} runs) | {extra}{same} |")
    return "\n".join(lines)


def markdown(results: list[dict], command: str, whole: dict | None = None) -> str:
    mode = results[0]["mode"] if results else "interleaved"
    how = ("launcher and plain steps alternate inside one run (a plain step before every even launcher step and "
           "after every odd one, timed apart; the launcher's metrics writer thread finishes before each plain step, "
           "on the launcher's clock)"
           if mode == "interleaved" else "launcher and plain in separate processes, alternating")
    return "\n".join([
        "## Overhead against a plain PyTorch loop",
        "",
        f"`{command}`: the same recipe, model, data, batch, AdamW + clipping, LR per step and number of steps; "
        f"{how}; OMP_NUM_THREADS=1; 2 processes: `accelerate launch --config_file accelerate_configs/cpu_ddp.yaml` "
        "(plain: gloo DDP). Steps/s and **launcher/plain** come from the per-step minimum over the runs (each step "
        "timed in every run, the fastest kept: load from other processes mostly stripped; flushes and epoch ends "
        "counted where they happen); the per-run column is the ratio of whole-run times. \"identical\": the "
        "two sides computed the same loss at every step. Syncs: host reads (`item`/`tolist`/`__bool__`/`__float__`/"
        "`__int__` from Python) plus Python-level `torch.distributed` calls per optimizer step, counted in a separate "
        "run of the same case by bench/sync_count.py (rank with the most). Targets: launcher/plain >= 0.98 at 1 "
        "process and >= 0.97 at 2.",
        "",
        table(results),
        "",
        *_notes(results, whole),
    ])


def _notes(results: list[dict], whole: dict | None = None) -> list[str]:
    lines = []
    if whole:
        calls = ", ".join(f"{k.split(':', 1)[1]} {v}" for k, v in sorted(whole["by_call"].items(), key=lambda kv: -kv[1]))
        lines.append(f"- A whole {whole['nproc']}-process `{whole['recipe']}` run (evaluations and checkpoints "
                     f"included): **{whole['per_step']:.3f}** host reads + collectives per optimizer step "
                     f"({whole['host_reads']} + {whole['collectives']} over {whole['steps']} steps; {calls}). "
                     f"Target: at most 0.3.")
    lines += [
        "- What the launcher does per step beyond the plain loop: the step's loss and gradient norm appended "
        "to device lists (`launcher.rows`), the next step's LRs looked up in the scheduler's per-epoch table "
        "(`LRScheduler.apply`), and the step-boundary checks (hooks, step checkpoints); with "
        "`train.on_nonfinite=skip`, the non-finite flag update on the device (2 tiny tensor ops; off in this "
        "comparison, whose recipe keeps the default `stop`). Every `train.log_every_n_steps` (25) steps: one "
        "stack and one host read (2 processes: one all-reduce of losses, non-finite flags and the preemption "
        "flag), the rows handed to the metrics writer thread, which makes and encodes the 25 JSON lines beside "
        "training (the plain loop encodes its lines inline).",
        "- Taken out of the step (the launcher calls torch directly where Accelerate's wrappers add nothing: "
        "`launcher.step.StepOps`): `AcceleratedOptimizer.step` looked the `lomo_optim` package up on disk twice "
        "per call, `zero_grad` called `inspect.signature`, `clip_grad_norm_` checked the torch version and walked "
        "the parameters for DTensors, `backward` divided the loss by 1, `accumulate` cost ~20 us without "
        "accumulation; and the prepared DataLoader's per-batch cost (`launcher.data.InMemoryLoader` serves "
        "in-memory datasets on CPU: the same batches and RNG draws).",
    ]
    return lines


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_worker"]:
        p = argparse.ArgumentParser()
        p.add_argument("--impl", choices=["launcher", "plain", "interleaved"])
        p.add_argument("--recipe")
        p.add_argument("--epochs", type=int)
        p.add_argument("--run_dir")
        p.add_argument("--out")
        a = p.parse_args(argv[1:])
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        if a.impl == "plain":
            run_plain(a.recipe, a.epochs, a.out)
        else:
            run_launcher(a.recipe, a.epochs, a.run_dir, a.out, interleave=a.impl == "interleaved")
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workloads", default="mnist1d,gpt_tiny", help="comma-separated: " + ", ".join(WORKLOADS))
    p.add_argument("--nprocs", default="1,2", help="comma-separated process counts")
    p.add_argument("--reps", type=int, default=3, help="runs (interleaved) or A/B pairs (separate) per case")
    p.add_argument("--mode", choices=["interleaved", "separate"], default="interleaved")
    p.add_argument("--no_count", action="store_true", help="skip the sync-count runs")
    p.add_argument("--count_run", default="recipes/mnist1d_fast.yaml",
                   help="also count syncs over this whole recipe at 2 processes (empty: skip)")
    p.add_argument("--json", default="", help="also write the results here")
    p.add_argument("--markdown", default="", help="also write the section for bench/RESULTS.md here")
    a = p.parse_args(argv)
    workloads = [w for w in a.workloads.split(",") if w]
    unknown = [w for w in workloads if w not in WORKLOADS]
    if unknown:
        p.error(f"unknown workload(s) {unknown}; choose from {', '.join(WORKLOADS)}")
    with tempfile.TemporaryDirectory(prefix="bench-overhead-") as work:
        results = compare(workloads, [int(n) for n in a.nprocs.split(",")], a.reps, a.mode, Path(work),
                          count=not a.no_count)
        whole = count_syncs(a.count_run, 2, Path(work), []) if a.count_run and not a.no_count else None
    shown, skip = [], False
    for arg in argv:  # the command as a reader would rerun it: without the output files
        if skip or arg.startswith(("--json=", "--markdown=")):
            skip = False
            continue
        skip = arg in ("--json", "--markdown")
        if not skip:
            shown.append(arg)
    command = " ".join(["python bench/overhead.py", *shown])
    text = markdown(results, command, whole)
    print("\n" + text)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"results": results, "whole_run_syncs": whole}, f, indent=2)
    if a.markdown:
        Path(a.markdown).write_text(text + "\n")


if __name__ == "__main__":
    main()
