"""Starting Accelerate safely: the right device, backend and precision, or a clear error.

docs/scaling.md ("Pitfalls the launcher catches") lists the silent failure modes measured with
accelerate on CPU; each is handled here, in launcher.launch_checks (checks of the launch before the
Accelerator exists) or in launcher.deepspeed_config (DeepSpeed JSON):
- `accelerate launch --multi_gpu` / torchrun on a machine without GPUs starts N processes that each
  believe they are alone unless the Accelerator gets `cpu=True`: we pass it whenever no GPU is
  present, so `accelerate_configs/cpu_ddp.yaml` works without ACCELERATE_USE_CPU.
- A launcher that set WORLD_SIZE > 1 but produced a non-distributed state is stopped with the fix.
- `accelerate launch --cpu --num_processes 2` (or a `use_cpu: true` / MULTI_CPU config) starts ONE
  process: we read the launch command of our parent process and stop with the fix.
- fp16 on CPU is silently ignored by Accelerate: refused here with a suggestion of bf16.
- DeepSpeed: Accelerate ignores it when `cpu=True` (so on CPU we pass `cpu=False` and gloo), fills a
  `gradient_clipping: "auto"` with 1.0 whatever the recipe says, and does not validate the JSON.
  We resolve the "auto" values from the recipe, validate with DeepSpeed's own parser and hand
  Accelerate a plugin with no "auto" left in the fields we own.
- FSDP on a machine without GPUs would silently become plain DDP: refused.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import TYPE_CHECKING

from launcher.deepspeed_config import make_deepspeed_plugin
from launcher.errors import UsageError
from launcher.launch_checks import (
    CPU_DDP_HINT,
    _env_flag,
    _expected_world_size,
    check_single_process_launch,
    resolve_mixed_precision,
)
from launcher.output import agree, let_main_rank_report_first

if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator

    from launcher.config import TrainConfig

__all__ = ["agree", "describe_device", "describe_engine", "engine_input_dtype", "is_deepspeed", "make_accelerator",
           "shutdown"]

FSDP_NEEDS_GPU = True
"""Refuse FSDP without GPUs. Accelerate turns FSDP on only for GPU-like devices; tests/fsdp_cpu.py lifts
that gate and this one to run the FSDP code path on CPU processes."""


def make_accelerator(train: TrainConfig, clip_grad_norm: float = 0.0, deepspeed_plugin=None,
                     fsdp_plugin=None) -> Accelerator:
    """An Accelerator for this launch, or a UsageError naming the misconfiguration and its fix.

    `clip_grad_norm` (optim.clip_grad_norm) is needed up front only by DeepSpeed, which clips
    inside its engine with the value from its config.
    """
    import torch

    has_gpu = torch.cuda.is_available()
    expected = _expected_world_size()
    use_deepspeed = deepspeed_plugin is not None or _env_flag("ACCELERATE_USE_DEEPSPEED")
    use_fsdp = fsdp_plugin is not None or _env_flag("ACCELERATE_USE_FSDP")
    try:
        mixed_precision = resolve_mixed_precision(train.mixed_precision, has_gpu)
        if expected == 1:
            check_single_process_launch()
        if use_fsdp and not has_gpu and FSDP_NEEDS_GPU:
            raise UsageError("FSDP needs GPUs (without them Accelerate silently falls back to plain data parallel); "
                             f"on CPU use `{CPU_DDP_HINT}` or accelerate_configs/cpu_deepspeed_zero2.yaml")
        if use_deepspeed and not has_gpu:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # what DeepSpeed picks anyway, minus its warning
        if use_deepspeed and deepspeed_plugin is None:
            deepspeed_plugin = make_deepspeed_plugin(train, clip_grad_norm, expected, mixed_precision)
    except UsageError:
        let_main_rank_report_first(5)
        raise

    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, InitProcessGroupKwargs

    # Without an explicit gloo backend, DeepSpeed on CPU makes each rank believe it is alone (docs/scaling.md, pitfalls).
    handlers = [InitProcessGroupKwargs(backend=None if has_gpu else "gloo", timeout=timedelta(minutes=30))] \
        if expected > 1 or (use_deepspeed and not has_gpu) else []
    accelerator = Accelerator(
        # Accelerate drops DeepSpeed when cpu=True; DeepSpeed's own CPU accelerator takes over instead.
        cpu=not has_gpu and not use_deepspeed,
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=train.grad_accum_steps,
        step_scheduler_with_optimizer=False,
        kwargs_handlers=handlers,
        deepspeed_plugin=deepspeed_plugin,
        fsdp_plugin=fsdp_plugin,
        # Batches from pinned memory are copied to the GPU without blocking the host until the
        # previous step's kernels are done (a blocking copy is a host sync on every step).
        dataloader_config=DataLoaderConfiguration(non_blocking=has_gpu),
    )
    if accelerator.num_processes != expected:
        raise UsageError(
            f"the launcher started {expected} processes but each one sees a world of {accelerator.num_processes}: "
            f"they would train separately. On CPU use `{CPU_DDP_HINT}` "
            "(or torchrun); check that all processes see the same MASTER_ADDR/MASTER_PORT")
    return accelerator



def is_deepspeed(accelerator: Accelerator) -> bool:
    return str(accelerator.distributed_type).endswith("DEEPSPEED")


def describe_device(accelerator: Accelerator) -> str:
    import torch

    device = accelerator.device
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return str(device.type)


def describe_engine(accelerator: Accelerator) -> list[str]:
    """Extra start-up lines for sharded engines (DeepSpeed ZeRO, FSDP); empty for DDP."""
    state = accelerator.state
    if is_deepspeed(accelerator):
        ds = state.deepspeed_plugin.deepspeed_config
        zero = ds.get("zero_optimization", {})
        offload = [f"{k.removeprefix('offload_')} -> {v.get('device')}" for k, v in zero.items()
                   if k.startswith("offload_") and isinstance(v, dict) and v.get("device", "none") != "none"]
        return [f"deepspeed: ZeRO stage {zero.get('stage', 0)}, micro-batch {ds.get('train_micro_batch_size_per_gpu')}, "
                f"accumulation {ds.get('gradient_accumulation_steps')}, gradient_clipping {ds.get('gradient_clipping')}"
                + (f", offload {', '.join(offload)}" if offload else "")]
    if str(accelerator.distributed_type).endswith("FSDP"):
        plugin = state.fsdp_plugin
        version = getattr(plugin, "fsdp_version", 1)
        sharding = f"reshard_after_forward {plugin.reshard_after_forward}" if version == 2 \
            else f"sharding {plugin.sharding_strategy}"
        policy = getattr(plugin.auto_wrap_policy, "func", plugin.auto_wrap_policy)
        return [f"fsdp: version {version}, {sharding}, auto-wrap {getattr(policy, '__name__', policy)}"]
    return []


def engine_input_dtype(accelerator: Accelerator) -> torch.dtype | None:
    """The dtype floating-point inputs must have: DeepSpeed casts the model to fp16/bf16 (no autocast)."""
    import torch

    if not is_deepspeed(accelerator):
        return None
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision)


def num_machines() -> int:
    """Machines in this launch: processes / processes per machine (torch elastic's environment)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    return max(1, world // max(1, local))


def shutdown(accelerator) -> None:
    """End trackers and the process group; gc first (gloo aborted at exit in 11 of 84 runs without it)."""
    import gc

    import torch

    gc.collect()
    accelerator.end_training()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
