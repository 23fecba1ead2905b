"""Derived facts of a run (never written back into the config): global batch, steps, scaled LR.

`make_plan` is pure and torch-free, so the trainer, the schedule preview and the LR finder all
compute these numbers the same way.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass

from launcher.config import Config
from launcher.errors import UsageError


@dataclass(frozen=True)
class Plan:
    num_processes: int
    per_device_batch: int
    grad_accum_steps: int
    global_batch: int
    """Samples per optimizer step: per_device_batch x num_processes x grad_accum_steps."""
    num_train_samples: int
    steps_per_epoch: int
    """Optimizer steps per epoch (samples that do not fill a global batch are left out that epoch)."""
    num_epochs: int
    total_steps: int
    base_lr: float
    """optim.lr after lr_scaling for the global batch."""
    lr_scale: float
    warmup_steps: int
    # Topology, filled in by the trainer once Accelerate has started (informational).
    distributed_type: str = "NO"
    num_machines: int = 1
    device: str = "cpu"
    mixed_precision: str = "no"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def describe(self) -> list[str]:
        return [
            f"topology: {self.distributed_type}, {self.num_processes} process(es) on {self.num_machines} machine(s), "
            f"device {self.device}, mixed precision {self.mixed_precision}",
            f"batch: {self.per_device_batch} per device x {self.num_processes} processes x {self.grad_accum_steps} "
            f"accumulation = {self.global_batch} global",
            f"steps: {self.steps_per_epoch} optimizer steps/epoch x {self.num_epochs} epochs = {self.total_steps}",
            f"lr: base {self.base_lr:.4g}" + (f" (optim.lr x {self.lr_scale:.4g} for the global batch)"
                                              if self.lr_scale != 1 else "")
            + f", warmup {self.warmup_steps} steps" + (f" ({self.warmup_steps / self.steps_per_epoch:.3g} epochs)"
                                                       if self.warmup_steps else ""),
        ]


def make_plan(cfg: Config, num_processes: int, num_train_samples: int) -> Plan:
    t, o, s = cfg.train, cfg.optim, cfg.schedule
    global_batch = t.batch_size * num_processes * t.grad_accum_steps
    steps_per_epoch = num_train_samples // global_batch
    if steps_per_epoch < 1:
        raise UsageError(
            f"train.batch_size: one optimizer step needs {global_batch} samples "
            f"({t.batch_size} x {num_processes} processes x {t.grad_accum_steps} accumulation) but the training set "
            f"has {num_train_samples}; lower train.batch_size or train.grad_accum_steps")
    total_steps = steps_per_epoch * t.num_epochs
    if t.max_steps:
        total_steps = min(total_steps, t.max_steps)
    num_epochs = math.ceil(total_steps / steps_per_epoch)
    if o.lr_scaling == "linear":
        lr_scale = global_batch / o.reference_batch_size
    elif o.lr_scaling == "sqrt":
        lr_scale = math.sqrt(global_batch / o.reference_batch_size)
    else:
        lr_scale = 1.0
    warmup_steps = s.warmup_steps or round(s.warmup_epochs * steps_per_epoch)
    if s.warmup_epochs and warmup_steps == 0:
        warmup_steps = 1
    if warmup_steps >= total_steps and warmup_steps > 0:
        warnings.warn(
            f"schedule: warmup ({warmup_steps} steps) is as long as the whole run ({total_steps} steps); "
            "the LR never reaches its base value", stacklevel=2)
    return Plan(
        num_processes=num_processes, per_device_batch=t.batch_size, grad_accum_steps=t.grad_accum_steps,
        global_batch=global_batch, num_train_samples=num_train_samples, steps_per_epoch=steps_per_epoch,
        num_epochs=num_epochs, total_steps=total_steps, base_lr=o.lr * lr_scale, lr_scale=lr_scale,
        warmup_steps=warmup_steps,
    )
