"""Resuming on another number of processes: what must stay equal, and loading state written by N ranks on M.

The data order follows from the global batch alone (`EpochSampler` cuts each epoch's permutation
into global batches; Accelerate deals each one's per-device pieces to the ranks), and every random
choice of data from (seed, epoch, sample index) (`SampleRandom`). So a checkpoint resumes on any
number of processes that keeps the global batch (per-device batch x processes x accumulation): the
same samples in every optimizer step, the same LR at every step (the plan and the schedule are
functions of the global batch), the same plateau state.

What is loaded, by how the state was saved:

- replicated (one process, DDP): `model.safetensors` and `optimizer.bin` hold the whole model and
  optimizer whatever the world size; they are loaded into the unwrapped model (DDP's `module.`
  prefix removed or not there) and the optimizer, on every rank.
- DeepSpeed ZeRO-1/2/3: every rank's optimizer partition (ZeRO-3: its parameter partition too) is
  laid out for the process count that wrote it, and DeepSpeed 0.19 refuses to load the partitions
  on another data-parallel size ("Automatic adjustment of ZeRO's optimizer state partitioning with a
  new world size is not currently supported"). On another count the checkpoint is converted to
  DeepSpeed's universal format (`deepspeed.checkpoint.ds_to_universal`, into
  `checkpoints/.universal-step_N/`, removed after loading; the original is only read) and loaded
  with the engine's `load_universal_checkpoint`.
- FSDP with `fsdp_state_dict_type: SHARDED_STATE_DICT` (measured with FSDP2): Accelerate writes the
  model and the optimizer with `torch.distributed.checkpoint` (DCP: per-rank shard files plus a
  `.metadata` of which slice of which tensor is where). DCP reads, on each rank of the new count,
  exactly the slices that rank's shards cover, so the same `load_fsdp_model` / `load_fsdp_optimizer`
  that resume on the same count reshard on another. FULL_STATE_DICT (whole files) loads on any count
  too. LOCAL_STATE_DICT (each rank's flat shard) does not, and a checkpoint of another state dict
  type than this run's is refused either way (Accelerate looks for the files of this run's type).
- Another engine's state (e.g. DeepSpeed's in an FSDP or DDP run) is refused (`check_engine`); its
  weights alone load anywhere through `train.init_from` (launcher.weights).

RNG states: with the same world size each rank gets its own back; on another world size every rank
gets rank 0's, as every rank starts a fresh run from the same seed.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from launcher.errors import UsageError
from launcher.weights import model_state

REPLICATED = ("NO", "MULTI_CPU", "MULTI_GPU", "MULTI_NPU", "MULTI_XPU", "MULTI_MLU", "MULTI_MUSA", "MULTI_HPU")
"""Accelerate distributed types whose model and optimizer state is the same on every rank."""


def distributed_type(accelerator) -> str:
    return str(accelerator.distributed_type).split(".")[-1]


def global_batch(values: dict[str, Any], num_processes: int) -> int | None:
    """per-device batch x processes x accumulation from a checkpoint's recipe values."""
    batch = values.get("train.batch_size")
    if not isinstance(batch, int):
        return None
    return batch * int(values.get("train.grad_accum_steps") or 1) * num_processes


def keep_hint(target: int, num_processes: int, batch_size: int, grad_accum: int) -> str:
    """The settings that give `target` samples per optimizer step on `num_processes` processes."""
    if target % num_processes:
        counts = [n for n in range(1, min(target, 1024) + 1) if target % n == 0]
        near = sorted(counts, key=lambda n: (abs(n - num_processes), n))[:2]
        return (f"no per-device batch gives {target} on {num_processes} processes: use a process count that "
                f"divides it (e.g. {', '.join(map(str, sorted(near)))})")
    per = target // num_processes
    options = []
    if grad_accum > 1 and per % grad_accum == 0:
        options.append(f"--train.batch_size={per // grad_accum}")
    if per % batch_size == 0 and per // batch_size != grad_accum:
        options.append(f"--train.grad_accum_steps={per // batch_size}")
    options.append(f"--train.batch_size={per} --train.grad_accum_steps=1")
    seen = list(dict.fromkeys(options))
    return "keep it with " + " or ".join(seen[:2])


def check_world_size(name: str, meta: dict[str, Any], compat: dict[str, Any], accelerator,
                     new_global_batch: bool = False) -> str | None:
    """None if the checkpoint resumes here as saved; a line for the log when it resumes on another
    process count or split of the global batch; UsageError when it cannot (another global batch
    without `new_global_batch`, sharded state on another process count)."""
    old_n, new_n = int(meta["world_size"]), accelerator.num_processes
    old_gb, new_gb = global_batch(meta["compat"], old_n), global_batch(compat, new_n)
    reshardable = check_engine(name, meta, accelerator)
    if old_n != new_n and not reshardable:
        raise UsageError(
            f"--resume: {name} holds {_recorded_kind(meta)} state sharded over {old_n} process(es) and cannot be "
            f"resharded to this run's {new_n} ({distributed_type(accelerator)}); resume it with {old_n} process(es)")
    if old_gb != new_gb and new_global_batch and old_gb:
        return f"global batch {old_gb} -> {new_gb} (--new_global_batch; {old_n} -> {new_n} process(es))"
    if old_gb != new_gb:
        was = f"{old_n} process(es) x {meta['compat'].get('train.batch_size')} x " \
              f"{meta['compat'].get('train.grad_accum_steps', 1)} accumulation"
        now = f"{new_n} x {compat.get('train.batch_size')} x {compat.get('train.grad_accum_steps', 1)}"
        hint = keep_hint(old_gb or 0, new_n, int(compat.get("train.batch_size") or 1),
                         int(compat.get("train.grad_accum_steps") or 1))
        raise UsageError(
            f"--resume: {name} was trained with a global batch of {old_gb} ({was}); this run has {now} = {new_gb}: "
            f"{hint}, or pass --new_global_batch to continue with {new_gb}")
    if old_n == new_n:
        return None
    return f"{old_n} -> {new_n} process(es), global batch {new_gb} kept"


def _recorded_kind(meta: dict[str, Any]) -> str:
    # (checkpoints that predate the field: only a one-process one is known to be replicated)
    return meta.get("distributed_type") or ("NO" if int(meta["world_size"]) == 1 else "UNRECORDED")


def _engine(kind: str) -> str:
    return "replicated (one process or DDP)" if kind in REPLICATED else {"DEEPSPEED": "DeepSpeed"}.get(kind, kind)


def check_engine(name: str, meta: dict[str, Any], accelerator) -> bool:
    """UsageError unless the checkpoint's model and optimizer state loads into this run's engine (the
    same engine, saved the same way); True when it also loads on another process count."""
    old, new = _recorded_kind(meta), distributed_type(accelerator)
    if old in REPLICATED and new in REPLICATED:
        return True
    if old == "UNRECORDED":
        return False
    if old != new:
        raise UsageError(f"--resume: {name} holds {_engine(old)} state and this run uses {_engine(new)}: resume it "
                         f"with the accelerate config that wrote it (its weights alone: python -m launcher.checkpoint "
                         f"export)")
    if new == "DEEPSPEED":
        stage = deepspeed_zero_stage(accelerator)
        if meta.get("zero_stage") not in (None, stage):
            raise UsageError(f"--resume: {name} holds DeepSpeed ZeRO-{meta['zero_stage']} state and this run uses "
                             f"ZeRO-{stage}: resume with the DeepSpeed config that wrote it")
        return stage in UNIVERSAL_ZERO_STAGES
    if new == "FSDP":
        check_fsdp_layout(name, meta, accelerator)
        return meta.get("fsdp_state_dict_type") in RESHARDABLE_FSDP
    return False


UNIVERSAL_ZERO_STAGES = (1, 2, 3)
"""ZeRO stages whose checkpoints resume on another process count through DeepSpeed's universal format
(stage 3 measured 2 -> 1 with two fixes after loading, `load_deepspeed_universal`)."""
UNIVERSAL_PREFIX = ".universal-"
"""`checkpoints/.universal-step_N/`: the converted copy, removed once loaded (the original is only read)."""


RESHARDABLE_FSDP = ("SHARDED_STATE_DICT", "FULL_STATE_DICT")
"""FSDP state dict types whose files load on any process count: DCP shards, whole files."""


def fsdp_state_dict_type(accelerator) -> str | None:
    """The FSDP plugin's state dict type by name (e.g. "SHARDED_STATE_DICT"); None outside FSDP."""
    plugin = getattr(accelerator.state, "fsdp_plugin", None) if distributed_type(accelerator) == "FSDP" else None
    kind = getattr(plugin, "state_dict_type", None)
    return None if kind is None else getattr(kind, "name", str(kind))


def engine_layout(accelerator) -> dict[str, Any]:
    """How the engine lays its state out on disk, for meta.json (empty for replicated state)."""
    kind, stage = fsdp_state_dict_type(accelerator), deepspeed_zero_stage(accelerator)
    return {**({"fsdp_state_dict_type": kind} if kind else {}), **({"zero_stage": stage} if stage is not None else {})}


def check_fsdp_layout(name: str, meta: dict[str, Any], accelerator) -> None:
    """UsageError unless an FSDP checkpoint was saved as this run saves (Accelerate loads the files of
    this run's `fsdp_state_dict_type`)."""
    saved, now = meta.get("fsdp_state_dict_type"), fsdp_state_dict_type(accelerator)
    if saved is not None and saved != now:
        raise UsageError(f"--resume: {name} holds FSDP state saved as {saved}, and this run's accelerate config "
                         f"saves {now}: resume with fsdp_state_dict_type: {saved} in the config")


def deepspeed_zero_stage(accelerator) -> int | None:
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return None if plugin is None else int(plugin.zero_stage)


def load_other_world_size(accelerator, model: torch.nn.Module, optimizer, path: str) -> None:
    """Load state written by another number of processes: whole-model files (one process, DDP), FSDP's
    DCP shards resharded on load, or, under DeepSpeed ZeRO, the checkpoint converted to DeepSpeed's
    universal format."""
    kind = distributed_type(accelerator)
    if kind == "DEEPSPEED":
        load_deepspeed_universal(accelerator, model, path)
    elif kind == "FSDP":
        load_fsdp(accelerator, model, optimizer, path)
    else:
        load_replicated(accelerator, model, optimizer, path)


def load_deepspeed_universal(accelerator, engine, path: str) -> None:
    """DeepSpeed's own way to change the data-parallel degree of a ZeRO checkpoint.

    The main process converts `<path>/pytorch_model` (the engine's shards, as `accelerator.save_state`
    writes them) with `deepspeed.checkpoint.ds_to_universal` into `checkpoints/.universal-<step>/`
    next to it; every rank then loads that with the engine's `load_universal_checkpoint` switched on,
    and the main process removes the copy. The original checkpoint is only read. The launcher's own
    state (state.json, RNG files) is loaded by the caller as for any checkpoint.
    """
    import shutil
    import subprocess
    import sys

    name = os.path.basename(os.path.normpath(path))
    work = os.path.join(os.path.dirname(os.path.normpath(path)), UNIVERSAL_PREFIX + name)
    tag = "pytorch_model"  # accelerate's ckpt_id for the first model
    failure = ""
    if accelerator.is_main_process:
        shutil.rmtree(work, ignore_errors=True)
        os.makedirs(work)
        # The launcher writes no universal_checkpoint_info of its own (Megatron does):
        # --inject_missing_state adds the default one to the converted copy.
        proc = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
                               "--input_folder", os.path.join(path, tag), "--output_folder", os.path.join(work, tag),
                               "--inject_missing_state", "--num_extract_workers", "1", "--num_merge_workers", "1"],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            failure = " ".join((proc.stderr or proc.stdout).strip().splitlines()[-1:]) or f"exit {proc.returncode}"
    from accelerate.utils import broadcast_object_list

    failure = broadcast_object_list([failure])[0] if accelerator.num_processes > 1 else failure
    if failure:
        if accelerator.is_main_process:
            shutil.rmtree(work, ignore_errors=True)
        raise UsageError(f"--resume: converting the DeepSpeed checkpoint {name} to the universal format for "
                         f"{accelerator.num_processes} process(es) failed ({failure}); resume it with the "
                         f"process count that wrote it")
    config = engine._config
    config.load_universal_checkpoint = True
    inner = getattr(getattr(engine, "optimizer", None), "optimizer", None)  # the torch optimizer ZeRO steps
    groups = [{k: v for k, v in g.items() if k not in ("params", "step")} for g in getattr(inner, "param_groups", [])]
    try:
        load_path, _ = engine.load_checkpoint(work, tag=tag)
        # Two things ZeRO-3's universal load gets wrong (DeepSpeed 0.19.8,
        # stage3.load_hp_checkpoint_state_from_checkpoint_dir_stage3), both measured here:
        # - every param group gets the first group's saved hyperparameters (weight decay on the
        #   no-decay group); they are this run's recipe values (the recipe check made sure): put back;
        # - every group's Adam `step` is one and the same tensor, which the fused/foreach step then
        #   increments once per group: each group gets its own copy.
        for group, saved in zip(inner.param_groups if groups else [], groups):
            group.update(saved)
        for state in getattr(inner, "state", {}).values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()
    finally:
        config.load_universal_checkpoint = False
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            shutil.rmtree(work, ignore_errors=True)
    if load_path is None:
        raise UsageError(f"--resume: DeepSpeed found no universal checkpoint in {work}")


def load_fsdp(accelerator, model: torch.nn.Module, optimizer, path: str) -> None:
    """FSDP model and optimizer state written by another number of processes, on every rank.

    What `accelerator.load_state` does for them, without its per-rank files (RNG, sampler) that only
    exist for the ranks that wrote them: with SHARDED_STATE_DICT, DCP loads into this run's shards
    whatever slices of the saved tensors they cover; with FULL_STATE_DICT, the whole tensors are
    loaded and sharded again.
    """
    from accelerate.utils import load_fsdp_model, load_fsdp_optimizer

    plugin = accelerator.state.fsdp_plugin
    load_fsdp_model(plugin, accelerator, model, path)
    load_fsdp_optimizer(plugin, accelerator, optimizer, model, path)
    _load_scaler(accelerator, path)


def _load_scaler(accelerator, path: str) -> None:
    scaler = getattr(accelerator, "scaler", None)
    scaler_file = os.path.join(path, "scaler.pt")
    if scaler is not None and os.path.isfile(scaler_file):
        scaler.load_state_dict(torch.load(scaler_file, map_location="cpu", weights_only=True))


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    while isinstance(getattr(model, "module", None), torch.nn.Module) or hasattr(model, "_orig_mod"):
        model = getattr(model, "_orig_mod", None) or model.module
    return model


def load_replicated(accelerator, model: torch.nn.Module, optimizer, path: str) -> None:
    """Load whole-model and whole-optimizer files saved by any number of processes, on every rank."""
    _unwrap(model).load_state_dict(model_state(path))
    optimizer.load_state_dict(torch.load(os.path.join(path, "optimizer.bin"), map_location="cpu",
                                         weights_only=True))
    _load_scaler(accelerator, path)


def rng_file(path: str, process_index: int, same_world_size: bool) -> str:
    return os.path.join(path, f"rng_{process_index if same_world_size else 0}.pt")


def keep_global_batch(cfg, checkpoint: str | None, accelerator):
    """The recipe with `train.batch_size` set so that this run's global batch is the checkpoint's.

    Applies when the run resumes on another process count with the checkpoint's own per-device batch
    and accumulation (a requeued job that landed on another allocation): per-device batch =
    global batch / (processes x accumulation), if that divides. Under DeepSpeed the engine's config
    (sized from the recipe when the accelerator was made; the engine is built later, by `prepare`)
    gets the same micro-batch. Anything else is left as it is for `check_world_size` to accept or
    refuse: settings the user changed, a global batch that no per-device batch gives here.
    """
    import dataclasses
    import json

    if checkpoint is None:
        return cfg
    with open(os.path.join(checkpoint, "meta.json")) as f:
        meta = json.load(f)
    saved = meta.get("compat") or {}
    n, t = accelerator.num_processes, cfg.train
    target = global_batch(saved, int(meta["world_size"]))
    if (target is None or target == t.batch_size * t.grad_accum_steps * n
            or saved.get("train.batch_size") != t.batch_size
            or int(saved.get("train.grad_accum_steps") or 1) != t.grad_accum_steps
            or target % (n * t.grad_accum_steps)):
        return cfg
    batch = target // (n * t.grad_accum_steps)
    if accelerator.is_main_process:
        print(f"resume: {n} process(es) instead of {meta['world_size']}: train.batch_size {t.batch_size} -> {batch} "
              f"per device keeps the checkpoint's global batch of {target}", flush=True)
    if distributed_type(accelerator) == "DEEPSPEED":
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        ds["train_micro_batch_size_per_gpu"] = batch
        ds["train_batch_size"] = target
    return dataclasses.replace(cfg, train=dataclasses.replace(t, batch_size=batch))


def rebatch(state: dict[str, Any], old_global_batch: int, plan, scheduler_now: dict[str, Any]) -> tuple[dict, str]:
    """state.json of a checkpoint, moved onto `plan`'s (new) global batch; and a line for the log.

    The run continues in the same epoch at the first new global batch that starts at or before the
    checkpoint's sample position (up to one global batch is read again). `step` keeps counting
    optimizer updates; the schedule continues at the same fraction of the run in the new plan's
    steps (warmup, decay, base LR of the new global batch), with the plateau state as saved.
    """
    train_state = dict(state["train_state"])
    samples = int(train_state["step_in_epoch"]) * old_global_batch
    step_in_epoch = min(samples // plan.global_batch, plan.steps_per_epoch)
    position = int(train_state["epoch"]) * plan.steps_per_epoch + step_in_epoch
    scheduler = {**state["scheduler"],
                 **{k: scheduler_now[k] for k in ("base_lrs", "warmup_steps", "steps_per_epoch", "total_steps")}}
    train_state["step_in_epoch"] = step_in_epoch
    again = samples - step_in_epoch * plan.global_batch
    line = (f"global batch {old_global_batch} -> {plan.global_batch}: epoch {train_state['epoch']} continues at "
            f"sample {step_in_epoch * plan.global_batch}" + (f" ({again} read again)" if again else "")
            + f", the schedule at step {position} of {plan.total_steps}")
    return {**state, "train_state": train_state, "scheduler": scheduler}, line


def continue_from(state: dict[str, Any], saved_global_batch: int | None, plan, scheduler_now: dict[str, Any]):
    """(state, plan, line): a loaded checkpoint's state moved onto `plan`'s global batch where it differs
    (`rebatch`, with its line for the log, else ""), and the plan counting steps as the state does."""
    line = ""
    if saved_global_batch not in (None, plan.global_batch):
        state, line = rebatch(state, saved_global_batch, plan, scheduler_now)
    return state, continue_plan(plan, state["train_state"]), line


def continue_plan(plan, train_state: dict[str, Any]):
    """`plan` with total_steps counted like `train_state['step']`, which may run ahead of the plan's own
    step numbers after a change of global batch (`rebatch`); the same plan otherwise."""
    import dataclasses

    offset = int(train_state["step"]) - (int(train_state["epoch"]) * plan.steps_per_epoch
                                         + int(train_state["step_in_epoch"]))
    return dataclasses.replace(plan, total_steps=plan.total_steps + offset) if offset else plan
