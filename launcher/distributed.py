"""Starting Accelerate safely: the right device, backend and precision, or a clear error.

DESIGN.md lists the silent failure modes measured with accelerate 1.15 on CPU; each is handled here:
- `accelerate launch --multi_gpu` / torchrun on a machine without GPUs starts N processes that each
  believe they are alone unless the Accelerator gets `cpu=True`: we pass it whenever no GPU is
  present, so `accelerate_configs/cpu_ddp.yaml` works without ACCELERATE_USE_CPU.
- A launcher that set WORLD_SIZE > 1 but produced a non-distributed state is stopped with the fix.
- fp16 on CPU is silently ignored by Accelerate: refused here with a suggestion of bf16.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import TYPE_CHECKING

from launcher.errors import UsageError

if TYPE_CHECKING:
    from accelerate import Accelerator

    from launcher.config import TrainConfig


def resolve_mixed_precision(requested: str, has_gpu: bool) -> str:
    mp = requested
    if mp == "auto":
        mp = os.environ.get("ACCELERATE_MIXED_PRECISION", "no") or "no"
    if mp not in ("no", "bf16", "fp16"):
        raise UsageError(f"train.mixed_precision: {mp!r} (from the accelerate config) is not supported; use no, bf16 or fp16")
    if mp == "fp16" and not has_gpu:
        raise UsageError("train.mixed_precision: fp16 needs a GPU (on CPU Accelerate silently ignores it); "
                         "use --train.mixed_precision=bf16 or no")
    return mp


def _expected_world_size() -> int:
    for var in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE"):
        if os.environ.get(var):
            return int(os.environ[var])
    return 1


def make_accelerator(train: TrainConfig, deepspeed_plugin=None, fsdp_plugin=None) -> Accelerator:
    import torch
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    has_gpu = torch.cuda.is_available()
    mixed_precision = resolve_mixed_precision(train.mixed_precision, has_gpu)
    expected = _expected_world_size()
    # Without an explicit backend, DeepSpeed on CPU makes each rank believe it is alone (DESIGN.md).
    handlers = [InitProcessGroupKwargs(backend=None if has_gpu else "gloo", timeout=timedelta(minutes=30))] \
        if expected > 1 else []
    accelerator = Accelerator(
        cpu=not has_gpu,
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=train.grad_accum_steps,
        step_scheduler_with_optimizer=False,
        kwargs_handlers=handlers,
        deepspeed_plugin=deepspeed_plugin,
        fsdp_plugin=fsdp_plugin,
    )
    if accelerator.num_processes != expected:
        raise UsageError(
            f"the launcher started {expected} processes but each one sees a world of {accelerator.num_processes}: "
            "they would train separately. On CPU use `accelerate launch --config_file accelerate_configs/cpu_ddp.yaml` "
            "(or torchrun); check that all processes see the same MASTER_ADDR/MASTER_PORT")
    return accelerator


def describe_device(accelerator: Accelerator) -> str:
    import torch

    device = accelerator.device
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return str(device.type)
