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
  guard        launcher.preemption   per-step agreement of all ranks: non-finite loss, preemption signals
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
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
    make_accelerator,
    shutdown,
)
from launcher.optim import build_optimizer
from launcher.plan import make_plan
from launcher.preemption import Faults, Preemption, StepGuard, Verdict
from launcher.resharding import continue_plan, keep_global_batch, rebatch
from launcher.schedule import LRScheduler
from launcher.tasks import build_task
from launcher.tracking import NullTracker, RunSummary, Tracker

LOG_EVERY_N_STEPS = 25
"""Host syncs for logging happen once per this many steps (and at epoch ends), not every step."""


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


class Trainer:
    def __init__(self, cfg: Config, run_dir: str, accelerator=None, resume: str | None = None,
                 new_global_batch: bool = False):
        self.cfg = cfg
        self.run_dir = run_dir
        self.accelerator = accelerator or make_accelerator(cfg.train, cfg.optim.clip_grad_norm)
        acc = self.accelerator
        self.is_main = acc.is_main_process

        from accelerate.utils import set_seed

        set_seed(cfg.train.seed)
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True)
        self.task = build_task(cfg.task, cfg.data)
        # Chosen before the plan: on another process count the per-device batch follows the checkpoint's global batch.
        self.resume_path = resolve_resume(resume, os.path.join(run_dir, CHECKPOINTS), acc) if resume is not None else None
        cfg = self.cfg = cfg if new_global_batch else keep_global_batch(cfg, self.resume_path, acc)
        self.plan = dataclasses.replace(
            make_plan(cfg, acc.num_processes, len(self.task.train_set)),
            distributed_type=str(acc.distributed_type).split(".")[-1], num_machines=_num_machines(),
            device=describe_device(acc), mixed_precision=acc.mixed_precision)

        model = self.task.model
        if cfg.train.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.optimizer = build_optimizer(model, cfg.optim, self.plan.base_lr, acc.device.type)
        self.sampler = EpochSampler(len(self.task.train_set), self.plan.global_batch, cfg.train.seed)
        train_loader, val_loader = self._loaders()
        # The scheduler is NOT passed to prepare(): Accelerate would step it once per process.
        self.model, self.optimizer, self.train_loader, self.val_loader = acc.prepare(
            model, self.optimizer, train_loader, val_loader)
        if cfg.train.compile:
            self.model = torch.compile(self.model)
        self.scheduler = LRScheduler(self.optimizer, cfg.schedule, [g["lr"] for g in self.optimizer.param_groups],
                                     self.plan.warmup_steps, self.plan.steps_per_epoch, self.plan.total_steps)
        self.state = TrainState()
        self.summary = RunSummary(cfg.tracking)
        self.preemption = Preemption(cfg.checkpoint.signal)
        self.preemption.install()
        self.faults = Faults.from_env(acc.process_index)
        self.guard = StepGuard(acc, cfg.train.on_nonfinite, cfg.train.max_nonfinite_skips, self.preemption)
        self.checkpoints = Checkpointer(cfg.checkpoint, run_dir, acc, self.model,
                                        compat_values(cfg, len(self.task.train_set)), self.faults, self.optimizer)
        self.checkpoints.new_global_batch = new_global_batch
        self.resumed_from: str | None = None
        self._preempt_checkpoint: str | None = None
        self._bar = None
        resumed_run_id = self._resume(resume) if resume is not None else None
        self.tracker = Tracker(run_dir, cfg.tracking, os.path.basename(run_dir), resume_run_id=resumed_run_id,
                               truncate_after_step=self.state.step if resume is not None else None) \
            if self.is_main else NullTracker()
        self._pending: list[tuple[int, float, list[float], torch.Tensor, torch.Tensor]] = []
        self._micro_losses: list[torch.Tensor] = []
        self._last_lrs = self.scheduler.get_last_lr()
        self._input_dtype = engine_input_dtype(acc)
        self._ops = StepOps(acc, self.optimizer, self.model, cfg.train.grad_accum_steps, cfg.optim.clip_grad_norm)

    # ------------------------------------------------------------------------------------------
    def _loaders(self):
        return build_loaders(self.task, self.cfg.train, self.cfg.data, self.sampler, self.accelerator)

    def _split(self, batch):
        """(inputs, targets); floating inputs cast to the model's dtype when DeepSpeed runs it in fp16/bf16."""
        inputs, targets = self.task.split(batch)
        if self._input_dtype is not None:
            inputs = cast_floats(inputs, self._input_dtype)
        return inputs, targets

    def log_start(self) -> None:
        self.print(f"task: {self.task.description or self.cfg.task.name}; run directory: {self.run_dir}")
        for line in [*self.plan.describe(), *describe_engine(self.accelerator)]:
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
        if not self.is_main:
            return
        if self._bar is not None:
            self._bar.write(message)
        else:
            print(message, flush=True)

    # ------------------------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        self.log_start()
        start = time.perf_counter() - self.state.elapsed
        plan = self.plan
        while self.state.status == "running" and self.state.epoch < plan.num_epochs \
                and self.state.step < plan.total_steps:
            epoch = self.state.epoch
            if hasattr(self.train_loader, "set_epoch"):
                self.train_loader.set_epoch(epoch)  # Accelerate re-sets the sampler's epoch from this
            self.sampler.set_epoch(epoch, self.state.step_in_epoch)
            self.model.train()
            self._open_bar(epoch)
            epoch_start = time.perf_counter()
            for batch in self.train_loader:
                loss, grad_norm, verdict = self.train_step(batch)
                if verdict is None:
                    continue
                self.state.step += 1
                self.state.step_in_epoch += 1
                self._record(loss, grad_norm)
                if self.state.step % LOG_EVERY_N_STEPS == 0:
                    self._flush()
                self.state.elapsed = time.perf_counter() - start
                if self.after_step(verdict) or self.state.step >= plan.total_steps:
                    break
            if self.state.status != "running":
                break
            self._flush()
            self.state.epoch += 1
            self.state.step_in_epoch = 0
            self.state.elapsed = time.perf_counter() - start
            metrics = self.evaluate() if self._eval_due() else {}
            self.end_epoch(metrics, time.perf_counter() - epoch_start)
            self.state.elapsed = time.perf_counter() - start
            self.after_epoch(metrics)
        if self.state.status == "running":
            self.state.status = "completed"
        return self.finish()

    def train_step(self, batch) -> tuple[torch.Tensor, torch.Tensor | None, Verdict | None]:
        """One micro-batch; returns (loss, grad norm, verdict), the verdict None until an optimizer step completes.

        The guard's verdict (one small all-reduce) comes before `optimizer.step()`: a non-finite step
        is skipped on every rank (gradients dropped, scheduler not stepped).
        """
        acc = self.accelerator
        inputs, targets = self._split(batch)
        with self._ops.accumulate():
            loss = self.faults.corrupt_loss(self.task.loss(self.model(inputs), targets), self.state.step + 1)
            self._ops.backward(loss)
            self._micro_losses.append(loss.detach())
            if not acc.sync_gradients:  # optimizer.step() would be a no-op until the last micro-batch
                return loss, None, None
            losses, self._micro_losses = self._micro_losses, []
            step_loss = torch.stack(losses).mean() if len(losses) > 1 else losses[0]
            grad_norm = self._ops.clip_grad_norm()
            verdict = self.guard.check(step_loss, grad_norm)
            if not verdict.nonfinite_ranks:
                self._ops.optimizer_step()
            self._ops.zero_grad()
        if not verdict.nonfinite_ranks and not acc.optimizer_step_was_skipped:
            self.scheduler.step()
        return step_loss, grad_norm, verdict

    # ------------------------------------------------------------------------------------------
    def after_step(self, verdict: Verdict) -> bool:
        """Every rank, with the same verdict: faults (tests), non-finite, preemption, step checkpoints.

        Returns True when training stops here.
        """
        s = self.state
        self.faults.after_step(s.step, self.run_dir, self.preemption)
        if verdict.nonfinite_ranks:
            self._report_nonfinite(verdict)
            if verdict.stop:
                self._flush()
                s.status = "nonfinite"
                return True
        if verdict.preempt:
            self._preempt()
            return True
        if self.checkpoints.due(s.step, s.step_in_epoch, self.plan.steps_per_epoch, self.plan.total_steps):
            self.save_checkpoint()
        return False

    def after_epoch(self, metrics: dict[str, float]) -> None:
        """After evaluation and the plateau step: the epoch's checkpoint, then any pending preemption."""
        path = self.save_checkpoint(metrics, reason="epoch") if self.cfg.checkpoint.enabled else None
        more = self.state.epoch < self.plan.num_epochs and self.state.step < self.plan.total_steps
        if more and self.guard.agree_preempt():
            self._preempt(saved=path)

    def save_checkpoint(self, metrics: dict[str, float] | None = None, reason: str = "step") -> str:
        """Every rank: flush the metric rows the checkpoint covers (an all-reduce), then write step_N."""
        self._flush()
        s = self.state
        state = {"train_state": s.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "summary": self.summary.state_dict(), "run_id": self.tracker.run_id}
        epoch = s.epoch + s.step_in_epoch / self.plan.steps_per_epoch
        return self.checkpoints.save(s.step, epoch, state, metrics, reason)

    def _resume(self, resume: str) -> str | None:
        """Load the checkpoint `resume` names on every rank; returns the tracker run id saved with it."""
        path = self.resume_path
        if path is None:
            self.print(f"--resume {resume}: no complete checkpoint in {self.checkpoints.dir}; starting fresh")
            return None
        state = self.checkpoints.load(path)
        if self.checkpoints.loaded_global_batch not in (None, self.plan.global_batch):
            state, line = rebatch(state, self.checkpoints.loaded_global_batch, self.plan, self.scheduler.state_dict())
            self.print(line)
        self.plan = continue_plan(self.plan, state["train_state"])
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
        self._preempt_checkpoint = saved
        what = f"checkpoint {saved} saved; resume with --resume auto" if saved else \
            "nothing saved (checkpoint.enabled is false)"
        self.print(f"preempted ({self.preemption.received or 'signal to another process'}) at step "
                   f"{self.state.step}: {what}")

    def _report_nonfinite(self, v: Verdict) -> None:
        t = self.cfg.train
        n = self.accelerator.num_processes
        what = (f"step {self.state.step}: non-finite loss on {v.nonfinite_loss_ranks} of {n} process(es)"
                if v.nonfinite_loss_ranks else f"step {self.state.step}: non-finite gradients")
        if not v.stop:
            message = f"warning: {what}: step skipped ({v.consecutive_skips} in a row; stop at {t.max_nonfinite_skips})"
        else:
            why, fix = ("train.on_nonfinite=stop", " (or --train.on_nonfinite=skip)") if t.on_nonfinite == "stop" \
                else (f"{v.consecutive_skips} consecutive skips = train.max_nonfinite_skips", "")
            message = (f"error: {what}: stopping ({why}); the weights were not updated and the last checkpoint "
                       f"({self.checkpoints.last_saved or 'none'}) is intact; lower optim.lr or set "
                       f"optim.clip_grad_norm{fix}, then --resume auto")
        if self.is_main:
            print(message, file=sys.stderr, flush=True)

    def _record(self, loss: torch.Tensor, grad_norm: torch.Tensor | None) -> None:
        """Keep the step's values on the device; they are read back in bulk by `_flush`."""
        epoch_frac = self.state.epoch + self.state.step_in_epoch / self.plan.steps_per_epoch
        gn = grad_norm.detach().float() if isinstance(grad_norm, torch.Tensor) else torch.tensor(
            math.nan if grad_norm is None else float(grad_norm), device=loss.device)
        self._pending.append((self.state.step, epoch_frac, self._last_lrs, loss.detach().float(), gn))
        self._last_lrs = [g["lr"] for g in self.optimizer.param_groups]  # what the scheduler set for the next step

    def _flush(self) -> None:
        """One host sync (and one all-reduce) for all steps since the last flush."""
        if not self._pending:
            self.tracker.flush()
            return
        losses = torch.stack([p[3] for p in self._pending])
        losses = self.accelerator.reduce(losses, reduction="mean")
        norms = torch.stack([p[4] for p in self._pending]).tolist()
        for (step, epoch, lrs, _, _), loss, norm in zip(self._pending, losses.tolist(), norms):
            row = {"step": step, "epoch": round(epoch, 6), "lr": lrs[0], "train/loss": loss, "train/grad_norm": norm}
            if len(lrs) > 1:
                row.update({f"lr/group{i}": lr for i, lr in enumerate(lrs)})
            self.tracker.log(row)
        last_loss = losses[-1].item()
        self._pending.clear()
        self.tracker.flush()
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{self._last_lrs[0]:.2e}", refresh=False)
            self._bar.n = self.state.step_in_epoch
            self._bar.refresh()

    # ------------------------------------------------------------------------------------------
    def _eval_due(self) -> bool:
        e = self.state.epoch
        return e % self.cfg.train.eval_every_n_epochs == 0 or e >= self.plan.num_epochs \
            or self.state.step >= self.plan.total_steps

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Metrics averaged over the whole validation set, identical on every rank.

        `gather_for_metrics` drops the samples Accelerate repeats to even out the last batch, so
        nothing is counted twice.
        """
        self.model.eval()
        sums: dict[str, torch.Tensor] = {}
        count = 0
        for batch in self.val_loader:
            inputs, targets = self._split(batch)
            per_sample = self.task.metrics(self.model(inputs), targets)
            gathered = self.accelerator.gather_for_metrics(per_sample)
            for name, values in gathered.items():
                sums[name] = sums.get(name, 0) + values.double().sum()
            count += len(next(iter(gathered.values())))
        means = {f"val/{k}": (v / count).item() for k, v in sums.items()}
        if self.task.finalize is not None:
            means.update({f"val/{k}": v for k, v in self.task.finalize(
                {k.removeprefix("val/"): v for k, v in means.items()}).items()})
        self.model.train()
        return means

    def end_epoch(self, metrics: dict[str, float], epoch_seconds: float) -> None:
        s = self.state
        if metrics:
            row = {"step": s.step, "epoch": s.epoch, **metrics, "time/elapsed": s.elapsed,
                   "time/epoch_seconds": epoch_seconds,
                   "throughput/samples_per_sec": self.plan.steps_per_epoch * self.plan.global_batch / epoch_seconds}
            if self.task.tokens_per_sample:
                row["throughput/tokens_per_sec"] = row["throughput/samples_per_sec"] * self.task.tokens_per_sample
                peak = self._peak_flops()
                if peak and self.task.flops_per_token:
                    row["throughput/mfu"] = (row["throughput/tokens_per_sec"] * self.task.flops_per_token
                                             / (peak * self.accelerator.num_processes))
            self.tracker.log(row)
            self.tracker.flush()
            self.summary.update(metrics, epoch=s.epoch, step=s.step, seconds=s.elapsed)
        message = self.scheduler.end_epoch(s.epoch, metrics) if metrics else None
        self._check_ranks_agree()
        self._close_bar()
        self.print(self._epoch_line(metrics, epoch_seconds))
        if message:
            self.print(message)

    def _peak_flops(self) -> float:
        """Peak FLOP/s of one device: train.peak_tflops, else the bf16 dense peak of a known GPU, else 0."""
        if self.cfg.train.peak_tflops:
            return self.cfg.train.peak_tflops * 1e12
        if self.accelerator.device.type != "cuda":
            return 0.0
        name = torch.cuda.get_device_name(self.accelerator.device)
        known = {"H200": 989, "H100": 989, "A100": 312, "L40S": 362, "A10G": 125, "L4": 121, "V100": 125}
        return next((tflops * 1e12 for key, tflops in known.items() if key in name), 0.0)

    def _check_ranks_agree(self) -> None:
        """Every rank must apply the same LR; a plateau decision taken on per-rank metrics would break this."""
        lr = self.scheduler.get_last_lr()[0]
        if self.accelerator.num_processes > 1:
            lrs = self.accelerator.gather(torch.tensor([lr], dtype=torch.float64, device=self.accelerator.device))
            if not torch.all(lrs == lrs[0]):
                raise RuntimeError(f"ranks disagree on the LR after epoch {self.state.epoch}: {lrs.tolist()}")
        log_dir = os.environ.get("LAUNCHER_RANK_LOG_DIR")  # testing aid: what each rank applied
        if log_dir:
            row = {"epoch": self.state.epoch, "step": self.state.step, "lr": lr,
                   "plateau": self.scheduler.plateau.state_dict() if self.scheduler.plateau else None}
            with open(os.path.join(log_dir, f"rank{self.accelerator.process_index}.jsonl"), "a") as f:
                f.write(json.dumps(row) + "\n")

    def _epoch_line(self, metrics: dict[str, float], seconds: float) -> str:
        vals = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        return (f"epoch {self.state.epoch}/{self.plan.num_epochs}  step {self.state.step}  {vals}  "
                f"lr {self.scheduler.get_last_lr()[0]:.3e}  {seconds:.1f}s")

    # ------------------------------------------------------------------------------------------
    def _open_bar(self, epoch: int) -> None:
        self._last_lrs = self.scheduler.get_last_lr()
        mode = self.cfg.train.progress_bar
        if not self.is_main or mode == "off" or (mode == "auto" and not sys.stderr.isatty()):
            return
        from tqdm.auto import tqdm

        self._bar = tqdm(total=self.plan.steps_per_epoch, initial=self.state.step_in_epoch,
                         desc=f"epoch {epoch + 1}/{self.plan.num_epochs}", unit="step", leave=False, dynamic_ncols=True)

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def finish(self) -> dict[str, Any]:
        self._close_bar()
        summary = self.summary.result(
            final_step=self.state.step, final_epoch=self.state.epoch, wall_seconds=self.state.elapsed,
            final_lr=self.scheduler.get_last_lr()[0], status=self.state.status)
        if self.is_main:
            tmp = os.path.join(self.run_dir, "summary.json.tmp")
            with open(tmp, "w") as f:
                json.dump(summary, f, indent=2)
            os.replace(tmp, os.path.join(self.run_dir, "summary.json"))
        dump_dir = os.environ.get("LAUNCHER_DEBUG_WEIGHTS_DIR")  # testing aid: every rank's final weights
        if dump_dir:
            weights = self.accelerator.unwrap_model(self.model).state_dict()
            torch.save({k: v.detach().float().cpu() for k, v in weights.items()},
                       os.path.join(dump_dir, f"rank{self.accelerator.process_index}.pt"))
        self.tracker.set_summary(summary)
        return summary

    def close(self) -> None:
        """Release trackers and the process group (gc first: avoids gloo's abort at exit, DESIGN.md)."""
        self._close_bar()
        self.tracker.close()
        self.accelerator.wait_for_everyone()  # no rank tears down the group while another still logs
        self.accelerator.free_memory()
        shutdown(self.accelerator)
        # Last: a requeue hook may end this job. Then ignore further signals: interpreter shutdown
        # restores the default handlers, and a SIGTERM (repeated by Slurm, or sent by torch elastic
        # once another rank has exited non-zero) would turn exit status 124 or 3 into a kill.
        if self.state.status == "preempted" and self.is_main:
            self.preemption.run_hooks(self._preempt_checkpoint or "", self.run_dir)
        if self.state.status in ("preempted", "nonfinite"):
            self.preemption.ignore_further()


class StepOps:
    """accumulate / backward / clip / step / zero_grad of one step, through Accelerate or straight to torch.

    Where Accelerate's wrappers would only add cost (no gradient scaler, no DeepSpeed / FSDP / XLA,
    a plain AcceleratedOptimizer), call torch directly: `AcceleratedOptimizer.step` looks for the
    `lomo_optim` package on disk twice per call and `zero_grad` calls `inspect.signature`,
    `clip_grad_norm_` checks the torch version and walks the parameters for DTensors, and
    `backward` divides the loss by 1 without accumulation. Together ~0.3 ms a step, ~10% of an
    MNIST-1D CNN step on CPU (bench/overhead.py). The arithmetic is the same either way.
    """

    def __init__(self, accelerator, optimizer, model, grad_accum_steps: int, clip_grad_norm: float):
        from accelerate.optimizer import AcceleratedOptimizer
        from accelerate.utils import DistributedType

        self.accelerator = accelerator
        self.optimizer = optimizer
        self.model = model
        self.max_norm = clip_grad_norm or math.inf
        plain = (type(optimizer) is AcceleratedOptimizer and getattr(accelerator, "scaler", None) is None
                 and accelerator.distributed_type in (DistributedType.NO, DistributedType.MULTI_CPU,
                                                      DistributedType.MULTI_GPU))
        self.torch_optimizer = optimizer.optimizer if plain else None
        self.params = [p for p in model.parameters() if p.requires_grad] if plain else None
        self.plain_backward = plain and grad_accum_steps == 1

    def accumulate(self):
        # Without accumulation (and outside DeepSpeed / FSDP) accelerate.accumulate only keeps
        # sync_gradients at its initial True, at ~20 us a step.
        return contextlib.nullcontext() if self.plain_backward else self.accelerator.accumulate(self.model)

    def backward(self, loss: torch.Tensor) -> None:
        if self.plain_backward:
            loss.backward()
        else:
            self.accelerator.backward(loss)

    def clip_grad_norm(self) -> torch.Tensor | None:
        if self.params is not None:
            return torch.nn.utils.clip_grad_norm_(self.params, self.max_norm)
        return self.accelerator.clip_grad_norm_(self.model.parameters(), self.max_norm)

    def optimizer_step(self) -> None:
        (self.torch_optimizer or self.optimizer).step()

    def zero_grad(self) -> None:
        (self.torch_optimizer or self.optimizer).zero_grad(set_to_none=True)


def _num_machines() -> int:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    return max(1, world // max(1, local))
