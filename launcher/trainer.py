"""The training loop on Accelerate. Features are components the loop calls; the loop fits on a screen.

Parts, declared up front in `Trainer.__init__`:
  accelerator  launcher.distributed  device, processes, precision, accumulation
  task         launcher.tasks        model, datasets, loss, metrics
  plan         launcher.plan         global batch, steps per epoch, scaled LR, warmup steps
  optimizer    launcher.optim        AdamW, no decay on biases / norms
  scheduler    launcher.schedule     warmup x decay x plateau, stepped once per optimizer update
  tracker      launcher.tracking     metrics.jsonl (+ W&B / TensorBoard) on the main process
  summary      launcher.tracking     best / final values, time to accuracy targets
  checkpoints  launcher.checkpoint   atomic step_N folders, resume, rotation
  guard        launcher.nonfinite    non-finite updates skipped on the device, stops decided at the flush
  preemption   launcher.preemption   signal flag, agreed by all ranks at the flush
  hooks        launcher.hooks        progress bar and your own code at named points

The hot path makes no host read and no collective of its own: step values stay on the device and
are read back in bulk every `train.log_every_n_steps` steps, before each checkpoint and at epoch
ends (`_sync`: one all-reduce and one read, which also carries the preemption flag), and each
evaluation costs one all-reduce.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch

from launcher.checkpoint import CHECKPOINTS, Checkpointer, compat_values, resolve_resume
from launcher.config import Config, to_dict, to_yaml
from launcher.data import EpochSampler, build_loaders, cast_floats
from launcher.distributed import (
    describe_device,
    describe_engine,
    engine_input_dtype,
    is_deepspeed,
    make_accelerator,
    num_machines,
    shutdown,
)
from launcher.evaluation import evaluate
from launcher.hooks import Hooks, load_hooks
from launcher.nonfinite import Event, NonFiniteGuard
from launcher.optim import build_optimizer
from launcher.plan import make_plan
from launcher.preemption import Preemption
from launcher.progress import ProgressBar
from launcher.resharding import continue_from, keep_global_batch
from launcher.rows import StepRows, metrics_lines, metrics_rows, read_back
from launcher.schedule import LRScheduler
from launcher.step import StepOps
from launcher.tasks import build_task
from launcher.throughput import throughput
from launcher.tracking import NullTracker, RunSummary, Tracker


@dataclass
class TrainState:
    step: int = 0
    """Optimizer steps taken (after accumulation); also the position in the data."""
    epoch: int = 0
    """Completed epochs."""
    step_in_epoch: int = 0
    elapsed: float = 0.0
    """Seconds of training so far (carried across resumes)."""
    status: str = "running"

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)


def seeded_task(cfg: Config):
    """The recipe's task, built right after seeding every RNG with `train.seed`: the initial weights
    are a function of the seed alone. The trainer goes on from the RNG state this leaves."""
    from accelerate.utils import set_seed

    set_seed(cfg.train.seed)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True)
    return build_task(cfg.task, cfg.data)


class Trainer:
    def __init__(self, cfg: Config, run_dir: str, accelerator=None, resume: str | None = None,
                 hooks: list | None = None, quiet: bool = False, new_global_batch: bool = False, task=None):
        """`hooks`: extra hooks (launcher.hooks) besides the recipe's; `quiet`: no progress lines (a tool
        driving the trainer, like the LR range test, prints its own); `new_global_batch`: continue a
        checkpoint with another global batch (launcher.resharding); `task`: the recipe's task as
        `seeded_task(cfg)` built it (and nothing has drawn from the RNGs since), else it is built here."""
        self.cfg = cfg
        self.quiet = quiet
        self.run_dir = run_dir
        self.accelerator = accelerator or make_accelerator(cfg.train, cfg.optim.clip_grad_norm)
        acc = self.accelerator
        self.is_main = acc.is_main_process

        self.task = task if task is not None else seeded_task(cfg)
        # Chosen before the plan: on another process count the per-device batch follows the checkpoint's global batch.
        self.resume_path = resolve_resume(resume, os.path.join(run_dir, CHECKPOINTS), acc) if resume is not None else None
        cfg = self.cfg = cfg if new_global_batch else keep_global_batch(cfg, self.resume_path, acc)
        self.plan = dataclasses.replace(
            make_plan(cfg, acc.num_processes, len(self.task.train_set)),
            distributed_type=str(acc.distributed_type).split(".")[-1], num_machines=num_machines(),
            device=describe_device(acc), mixed_precision=acc.mixed_precision)

        model = self.task.model
        self._init_line = None
        if cfg.train.init_from and self.resume_path is None:  # a resumed run has its own weights
            from launcher.weights import init_model

            self._init_line = init_model(model, cfg.train.init_from)
        if cfg.train.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.optimizer = build_optimizer(model, cfg.optim, self.plan.base_lr, acc.device.type)
        self.sampler = EpochSampler(len(self.task.train_set), self.plan.global_batch, cfg.train.seed)
        train_loader, self.val_loader = build_loaders(self.task, cfg.train, cfg.data, self.sampler, acc)
        # The scheduler is NOT passed to prepare(): Accelerate would step it once per process.
        self.model, self.optimizer, self.train_loader = acc.prepare(model, self.optimizer, train_loader)
        if cfg.train.compile:
            self.model = torch.compile(self.model)
        self.scheduler = LRScheduler(getattr(self.optimizer, "optimizer", self.optimizer), cfg.schedule,
                                     [g["lr"] for g in self.optimizer.param_groups],
                                     self.plan.warmup_steps, self.plan.steps_per_epoch, self.plan.total_steps)
        self.state = TrainState()
        self.summary = RunSummary(cfg.tracking)
        self.progress = ProgressBar(cfg.train.progress_bar, self.is_main)
        self.hooks = Hooks([*([self.progress] if self.progress.enabled else []), *load_hooks(cfg.train.hooks),
                            *(hooks or [])])
        self.preemption = Preemption(cfg.checkpoint.signal)
        self.preemption.install()
        self._ops = StepOps(acc, self.optimizer, self.model, cfg.train.grad_accum_steps, cfg.optim.clip_grad_norm)
        self.guard = NonFiniteGuard(
            cfg.train.on_nonfinite, cfg.train.max_nonfinite_skips, acc.device,
            torch_optimizer=None if is_deepspeed(acc) else getattr(self.optimizer, "optimizer", self.optimizer),
            scaler=getattr(acc, "scaler", None) is not None)
        self.checkpoints = Checkpointer(cfg.checkpoint, run_dir, acc, self.model,
                                        compat_values(cfg, len(self.task.train_set)),
                                        on_save=lambda step, path: self.hooks.on_save(self, step, path),
                                        optimizer=self.optimizer)
        self.checkpoints.new_global_batch = new_global_batch
        self.resumed_from: str | None = None
        resumed_run_id = self._resume(resume) if resume is not None else None
        self.tracker = Tracker(run_dir, cfg.tracking, os.path.basename(run_dir), resume_run_id=resumed_run_id,
                               truncate_after_step=self.state.step if resume is not None else None) \
            if self.is_main else NullTracker()
        self.rows = StepRows()  # the steps since the last flush
        self._micro_losses: list[torch.Tensor] = []
        # Steps counted ahead of the schedule's position: nonzero only after a change of global batch
        # (launcher.resharding), where the schedule continues at the data position of the new plan.
        st = self.state
        self._schedule_offset = st.step - (st.epoch * self.plan.steps_per_epoch + st.step_in_epoch)
        self.scheduler.apply(st.step + 1 - self._schedule_offset)
        self._input_dtype = engine_input_dtype(acc)
        self._single = acc.num_processes == 1
        self._guard_per_step = self.guard.per_step
        self._flush_hooks = self.hooks.has("on_flush")
        self._loss_hooks = self.hooks.has("on_loss")
        self._after_step_hooks = self.hooks.has("after_step")
        self._log_every = cfg.train.log_every_n_steps
        self._ckpt_every = cfg.checkpoint.every_n_steps if cfg.checkpoint.enabled else 0
        self._eval_preempt = False
        self._start = time.perf_counter()

    # ------------------------------------------------------------------------------------------
    def _split(self, batch):
        """(inputs, targets); floating inputs cast to the model's dtype when DeepSpeed runs it in fp16/bf16."""
        inputs, targets = self.task.split(batch)
        if self._input_dtype is not None:
            inputs = cast_floats(inputs, self._input_dtype)
        return inputs, targets

    def log_start(self) -> None:
        self.print(f"task: {self.task.description or self.cfg.task.name}; run directory: {self.run_dir}")
        for line in [*self.plan.describe(), *describe_engine(self.accelerator), *filter(None, [self._init_line])]:
            self.print(line)
        if self.is_main:
            config_path = os.path.join(self.run_dir, "config.yaml")
            if self.resumed_from is None or not os.path.exists(config_path):  # a resumed run keeps its own
                with open(config_path, "w") as f:
                    f.write(to_yaml(self.cfg))
            with open(os.path.join(self.run_dir, "plan.json"), "w") as f:
                json.dump(self.plan.to_dict(), f, indent=2)
        self.tracker.log_config(to_dict(self.cfg), self.plan.to_dict())

    def print(self, message: str) -> None:
        if self.is_main and not self.quiet and not self.progress.write(message):
            print(message, flush=True)

    # ------------------------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        self.log_start()
        self._start = time.perf_counter() - self.state.elapsed
        self.hooks.on_train_start(self)
        while self._running():
            self.run_epoch()
        if self.state.status == "running":
            self.state.status = "completed"
        return self.finish()

    def _running(self) -> bool:
        s, plan = self.state, self.plan
        return s.status == "running" and s.epoch < plan.num_epochs and s.step < plan.total_steps

    def _tick(self) -> None:
        self.state.elapsed = time.perf_counter() - self._start

    def run_epoch(self) -> None:
        s = self.state
        if hasattr(self.train_loader, "set_epoch"):
            self.train_loader.set_epoch(s.epoch)  # Accelerate re-sets the sampler's epoch from this
        self.sampler.set_epoch(s.epoch, s.step_in_epoch)
        self.model.train()
        self.hooks.on_epoch_start(self)
        epoch_start = time.perf_counter()
        for batch in self.train_loader:
            if self.train_step(batch) and self.after_step():
                break
        if (s.status == "running" or self.rows.losses) and self._sync():  # the epoch's last rows
            return
        if s.status != "running":  # a stop or a preemption ends here
            return
        s.epoch += 1
        s.step_in_epoch = 0
        self._tick()
        metrics = self.evaluate() if self._eval_due() else {}
        self.end_epoch(metrics, time.perf_counter() - epoch_start)
        self.after_epoch(metrics)

    def train_step(self, batch) -> bool:
        """One micro-batch; True when it completed an optimizer step. No host read, no collective.

        A non-finite update is skipped on the device (launcher.nonfinite). The schedule advances on
        every optimizer step, skipped or not: `state.step` is the one step counter, the LR of step k
        is the schedule's LR of step k, and the data position follows it (docs/checkpoints.md).
        The step's loss and gradient norm stay on the device until `_flush` reads them in bulk.
        """
        inputs, targets = self._split(batch)
        with self._ops.accumulate():
            loss = self.task.loss(self.model(inputs), targets)
            if self._loss_hooks:
                loss = self.hooks.on_loss(self, loss, self.state.step + 1)
            self._ops.backward(loss)
            self._micro_losses.append(loss.detach())
            if not self.accelerator.sync_gradients:  # optimizer.step() would be a no-op until the last micro-batch
                return False
            losses, self._micro_losses = self._micro_losses, []
            grad_norm = self._ops.clip_grad_norm()
            if not self._guard_per_step or self.guard.before_step(grad_norm):
                self._ops.optimizer_step()
            self._ops.zero_grad()
        s, scheduler = self.state, self.scheduler
        s.step += 1
        s.step_in_epoch += 1
        rows = self.rows
        rows.losses.append(torch.stack(losses).mean() if len(losses) > 1 else losses[0])
        rows.norms.append(grad_norm)
        rows.lrs.append(scheduler.lrs)  # what this step used
        scheduler.apply(s.step + 1 - self._schedule_offset)
        return True

    # ------------------------------------------------------------------------------------------
    def after_step(self) -> bool:
        """Every rank, after each optimizer step: signals, hooks, flushes, step checkpoints. True: stop the epoch."""
        s = self.state
        if self._single and self.preemption.requested:  # one process: act at the step in flight
            return self._sync(preempt=True)
        if self._after_step_hooks:
            self.hooks.after_step(self)
        due = bool(self._ckpt_every) and s.step % self._ckpt_every == 0 and self.checkpoints.due(
            s.step, s.step_in_epoch, self.plan.steps_per_epoch, self.plan.total_steps)
        if (due or s.step % self._log_every == 0) and self._sync():
            return True
        if s.status != "running":  # a hook called stop()
            return True
        if due:
            self.save_checkpoint()
        return s.step >= self.plan.total_steps

    def stop(self, status: str = "stopped") -> None:
        """For hooks: end training after this step (every rank must decide alike, e.g. in on_flush)."""
        self.state.status = status

    def after_epoch(self, metrics: dict[str, float]) -> None:
        """After evaluation and the plateau step: the epoch's checkpoint, then any pending preemption."""
        path = self.save_checkpoint(metrics, reason="epoch") if self.cfg.checkpoint.enabled else None
        requested = self._eval_preempt or (self._single and self.preemption.requested)
        if requested and self._running():
            self._preempt(saved=path)

    def _sync(self, preempt: bool = False) -> bool:
        """Read the rows back and agree on preemption (all ranks); True when training stops here.

        One process decides on preemption at the top of `after_step` (`preempt`), so a signal that
        arrives during a step is acted on right after that step, whichever flush comes first.
        """
        self._tick()
        agreed, stop = self._flush()
        if stop is not None:
            self.state.status = "nonfinite"
            return True
        if preempt or agreed:
            self._preempt()
            return True
        return False

    def save_checkpoint(self, metrics: dict[str, float] | None = None, reason: str = "step") -> str:
        """Every rank, right after a `_sync` (so the rows the checkpoint covers are on disk): write step_N."""
        s = self.state
        self._tick()
        state = {"train_state": s.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "summary": self.summary.state_dict(), "run_id": self.tracker.run_id}
        epoch = s.epoch + s.step_in_epoch / self.plan.steps_per_epoch
        self.tracker.flush()  # the rows this checkpoint covers are on disk before it exists
        return self.checkpoints.save(s.step, epoch, state, metrics, reason)

    def _resume(self, resume: str) -> str | None:
        """Load the checkpoint `resume` names on every rank; returns the tracker run id saved with it."""
        path = self.resume_path
        if path is None:
            self.print(f"--resume {resume}: no complete checkpoint in {self.checkpoints.dir}; starting fresh")
            return None
        state, self.plan, line = continue_from(self.checkpoints.load(path), self.checkpoints.loaded_global_batch,
                                               self.plan, self.scheduler.state_dict())
        if line:
            self.print(line)
        self.state.load_state_dict(state["train_state"])
        self.state.status = "running"
        self.scheduler.load_state_dict(state["scheduler"])
        self.summary.load_state_dict(state["summary"])
        self.resumed_from = path
        self.print(f"resumed from {path}: step {self.state.step}, epoch {self.state.epoch} "
                   f"+ {self.state.step_in_epoch} steps" + (f"; {self.checkpoints.elastic}" if self.checkpoints.elastic
                                                            else ""))
        return state.get("run_id")

    def _preempt(self, saved: str | None = None) -> None:
        if saved is None and self.cfg.checkpoint.enabled:
            saved = self.save_checkpoint(reason="preempt")
        self.state.status = "preempted"
        what = f"checkpoint {saved} saved; resume with --resume auto" if saved else \
            "nothing saved (checkpoint.enabled is false)"
        self.print(f"preempted ({self.preemption.received or 'signal to another process'}) at step "
                   f"{self.state.step}: {what}")

    def _report_nonfinite(self, event: Event) -> None:
        if self.is_main:
            print(event.message(self.cfg.train, self.accelerator.num_processes, self.checkpoints.last_saved),
                  file=sys.stderr, flush=True)

    # ------------------------------------------------------------------------------------------
    def _flush(self) -> tuple[bool, Event | None]:
        """Read back every step since the last flush (launcher.rows), decide on non-finite steps, log the rows.

        Returns (preempt agreed, the non-finite stop event if the policy stops in these steps).
        """
        s, n = self.state, self.accelerator.num_processes
        losses, norms, lrs = self.rows.take()
        p = len(losses)
        if not p and n == 1:
            self.tracker.flush(wait=False)
            return False, None
        self.guard.saw_norms(norms)
        got = read_back(losses, norms, n, self.accelerator.device, self.preemption.requested)
        first = s.step - p + 1
        events = self.guard.decide(range(first, s.step + 1), got.loss_bad_ranks, got.norms)
        stop = events[-1] if events and events[-1].stop else None
        kept = p if stop is None else stop.step - first + 1  # after a stop the weights froze: no more rows
        # Every pending step is in the current epoch (an epoch's end always flushes).
        columns = (first, s.epoch, s.step_in_epoch - s.step, self.plan.steps_per_epoch, lrs[:kept], got.losses[:kept],
                   got.norms[:kept])
        for event in events:
            self._report_nonfinite(event)
        if stop is not None:
            undone = s.step - stop.step
            s.step -= undone
            s.step_in_epoch -= undone
        text = metrics_lines(*columns) if self.is_main else ""  # the JSON lines, without making the rows
        if self._flush_hooks:
            rows = metrics_rows(*columns)
            self.tracker.log_formatted(text, lambda: rows)
            self.hooks.on_flush(self, rows)
        else:  # W&B / TensorBoard get the rows from the writer thread
            self.tracker.log_formatted(text, functools.partial(metrics_rows, *columns))
        self.tracker.flush(wait=False)
        return got.preempt, stop

    # ------------------------------------------------------------------------------------------
    def _eval_due(self) -> bool:
        e = self.state.epoch
        return e % self.cfg.train.eval_every_n_epochs == 0 or e >= self.plan.num_epochs \
            or self.state.step >= self.plan.total_steps

    def evaluate(self) -> dict[str, float]:
        """Validation metrics over the whole set, identical on every rank (launcher.evaluation): one all-reduce."""
        metrics, self._eval_preempt = evaluate(self.model, self.val_loader, self._split, self.task, self.accelerator,
                                               self.scheduler.get_last_lr()[0], self.preemption.requested,
                                               self.state.epoch)
        return metrics

    def end_epoch(self, metrics: dict[str, float], epoch_seconds: float) -> None:
        s = self.state
        if metrics:
            row = {"step": s.step, "epoch": s.epoch, **metrics, "time/elapsed": s.elapsed,
                   "time/epoch_seconds": epoch_seconds,
                   **throughput(self.plan, self.task, epoch_seconds, self.cfg.train.peak_tflops, self.accelerator)}
            self.tracker.log(row)
            self.tracker.flush(wait=False)
            self.summary.update(metrics, epoch=s.epoch, step=s.step, seconds=s.elapsed)
        message = self.scheduler.end_epoch(s.epoch, metrics) if metrics else None
        self.hooks.on_epoch_end(self, metrics)
        self.print(self._epoch_line(metrics, epoch_seconds))
        if message:
            self.print(message)

    def _epoch_line(self, metrics: dict[str, float], seconds: float) -> str:
        vals = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        return (f"epoch {self.state.epoch}/{self.plan.num_epochs}  step {self.state.step}  {vals}  "
                f"lr {self.scheduler.get_last_lr()[0]:.3e}  {seconds:.1f}s")

    # ------------------------------------------------------------------------------------------
    def finish(self) -> dict[str, Any]:
        self.progress.close()
        summary = self.summary.result(
            final_step=self.state.step, final_epoch=self.state.epoch, wall_seconds=self.state.elapsed,
            final_lr=self.scheduler.get_last_lr()[0], status=self.state.status)
        if self.is_main:
            tmp = os.path.join(self.run_dir, "summary.json.tmp")
            with open(tmp, "w") as f:
                json.dump(summary, f, indent=2)
            os.replace(tmp, os.path.join(self.run_dir, "summary.json"))
        self.hooks.on_finish(self, summary)
        self.tracker.set_summary(summary)
        return summary

    def close(self) -> None:
        """Release trackers and the process group (gc first: avoids gloo's abort at exit: docs/scaling.md, pitfalls)."""
        self.progress.close()
        self.tracker.close()
        self.accelerator.wait_for_everyone()  # no rank tears down the group while another still logs
        self.accelerator.free_memory()
        shutdown(self.accelerator)
        # Last: a requeue hook may end this job. Then ignore further signals: interpreter shutdown
        # restores the default handlers, and a SIGTERM (repeated by Slurm, or sent by torch elastic
        # once another rank has exited non-zero) would turn exit status 124 or 3 into a kill.
        if self.state.status == "preempted" and self.is_main:
            self.preemption.run_hooks(self.checkpoints.last_saved or "", self.run_dir)
        if self.state.status in ("preempted", "nonfinite"):
            self.preemption.ignore_further()
