"""Model weights out of checkpoints, whatever engine wrote them: `export` (one safetensors file) and
`init_model` (`train.init_from`: a new run starts from them).

    python -m launcher.checkpoint export runs/NAME                 # the newest intact checkpoint
    python -m launcher.checkpoint export runs/NAME/checkpoints/step_00000480 --output model.safetensors

A checkpoint holds the model as its engine saved it: whole files (one process, DDP), per-rank DCP
shards (FSDP `SHARDED_STATE_DICT`), one whole file (FSDP `FULL_STATE_DICT`) or DeepSpeed ZeRO
partitions. Export gathers them on one CPU process (no GPU, no process group) into the plain
`state_dict` of the task's model: the names of `task.model.named_parameters()` (no `module.` or
`_orig_mod.` prefix), fp32 where the checkpoint holds fp32 master weights. Load it with

    task.model.load_state_dict(safetensors.torch.load_file("model.safetensors"))

The checkpoint's files are checked against their hashes first; a damaged one is refused. Every
parameter recorded in meta.json must come out with its recorded shape, or nothing is written. The
file is written next to it under a temporary name and renamed into place; an existing file is
never overwritten.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile

from launcher.checkpoint_files import named_checkpoint
from launcher.errors import UsageError

__all__ = ["check_source", "export", "init_model", "model_state", "plain_names", "read_weights"]


def plain_names(state: dict) -> dict:
    """`state` with the names of the model inside DDP / torch.compile wrappers (no `module.`, `_orig_mod.`)."""
    out = {}
    for key, value in state.items():
        for prefix in ("_orig_mod.", "module."):
            while key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def _resolve(target: str, what: str = "export"):
    """The intact checkpoint `target` names: a step_N folder, a run directory or its checkpoints/ folder."""
    check_source(target, what)
    ckpt, problem, skipped = named_checkpoint(target)
    if problem is not None:
        raise UsageError(f"{what}: {target} is not an intact checkpoint ({problem}); see python -m "
                         f"launcher.checkpoint verify on its run directory")
    if ckpt is None:
        why = f" (newest, {os.path.basename(skipped[0][0])}: {skipped[0][1]})" if skipped else ""
        raise UsageError(f"{what}: no intact checkpoint in {target}{why}; pass a run directory or a "
                         f"checkpoints/step_N folder")
    return ckpt


def model_state(path: str) -> dict:
    """The model's whole state dict from the checkpoint folder `path`, on the CPU, in plain names."""
    import torch

    def load(file: str) -> dict:
        return torch.load(file, map_location="cpu", weights_only=True)

    if os.path.isfile(os.path.join(path, "model.safetensors")):  # one process, DDP
        from safetensors.torch import load_file

        state = load_file(os.path.join(path, "model.safetensors"), device="cpu")
    elif os.path.isfile(os.path.join(path, "pytorch_model.bin")):
        state = load(os.path.join(path, "pytorch_model.bin"))
    elif os.path.isdir(os.path.join(path, "pytorch_model_fsdp_0")):  # FSDP SHARDED_STATE_DICT: DCP shards
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        with tempfile.TemporaryDirectory() as scratch:
            whole = os.path.join(scratch, "model.pt")
            dcp_to_torch_save(os.path.join(path, "pytorch_model_fsdp_0"), whole)
            state = load(whole)["model"]  # Accelerate saves {"model": model.state_dict()}
    elif os.path.isfile(os.path.join(path, "pytorch_model_fsdp.bin")):  # FSDP FULL_STATE_DICT
        state = load(os.path.join(path, "pytorch_model_fsdp.bin"))
    elif os.path.isdir(os.path.join(path, "pytorch_model")):  # DeepSpeed ZeRO partitions
        if not torch.cuda.is_available():
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # what DeepSpeed picks anyway, minus its warning
        try:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        except ImportError:
            raise UsageError(f"export: {path} holds DeepSpeed ZeRO partitions; install DeepSpeed to gather "
                             f"them (pip install 'launcher[deepspeed]')") from None
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # its progress
            state = get_fp32_state_dict_from_zero_checkpoint(path, tag="pytorch_model")
    else:
        raise UsageError(f"export: {path} holds no model weights this launcher wrote (model.safetensors, "
                         f"pytorch_model_fsdp_0/, pytorch_model/)")
    return plain_names(state)


def check_source(source: str, what: str = "train.init_from") -> None:
    """UsageError unless `source` exists (a file or a folder); cheap, for checks before a run starts."""
    if not os.path.exists(source):
        takes = "a weights file (.safetensors, .pt), a checkpoint folder or a run directory" \
            if what == "train.init_from" else "a run directory or a checkpoints/step_N folder"
        raise UsageError(f"{what}: {source!r} not found; pass {takes}")


def read_weights(source: str, what: str = "train.init_from") -> tuple[dict, str]:
    """(state dict in plain names, where it came from) of a weights file (.safetensors; else a
    `torch.save`d state dict, read with weights_only), a checkpoint folder or a run directory."""
    import torch

    check_source(source, what)
    if os.path.isdir(source):
        ckpt = _resolve(source, what)
        return model_state(ckpt.path), f"{ckpt.path} (step {ckpt.step})"
    try:
        if source.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(source, device="cpu")
        else:
            state = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated file, another format, pickled objects
        raise UsageError(f"{what}: cannot read {source} as model weights ({type(err).__name__}: "
                         f"{str(err).splitlines()[0][:200] if str(err) else 'no detail'})") from None
    if isinstance(state, dict) and not any(torch.is_tensor(v) for v in state.values()):
        state = state.get("model") or state.get("state_dict") or state  # {"model": {...}} wrappers
    if not isinstance(state, dict) or not state or not all(torch.is_tensor(v) for v in state.values()):
        raise UsageError(f"{what}: {source} holds no state dict of tensors")
    return plain_names(state), source


def init_model(model, source: str) -> str:
    """Load the weights `source` names (`read_weights`) into `model`, which must take all of them as
    they are (names and shapes); returns a line for the log, or UsageError naming what does not fit."""
    state, where = read_weights(source)
    own = model.state_dict()
    problems = [f"{k} missing" for k in own if k not in state]
    problems += [f"{k} not in the model" for k in state if k not in own]
    problems += [f"{k} {list(state[k].shape)} -> {list(own[k].shape)}" for k in own
                 if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if problems:
        more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
        raise UsageError(f"train.init_from: the weights in {where} do not fit this run's model: "
                         f"{'; '.join(problems[:3])}{more}; use weights of the same task.model and task.options")
    model.load_state_dict(state)
    return f"init_from: {len(state)} tensors from {where}"


def export(target: str, output: str | None = None) -> str:
    """Write the model weights of the checkpoint `target` names to `output` (default: next to the run's
    checkpoints/, `model-step_N.safetensors`); returns the path written."""
    import torch
    from safetensors.torch import save_file

    ckpt = _resolve(target)
    name = os.path.basename(os.path.normpath(ckpt.path))
    if output is None:
        run_dir = os.path.dirname(os.path.dirname(os.path.abspath(ckpt.path)))
        output = os.path.join(run_dir, f"model-{name}.safetensors")
    if not isinstance(output, str) or not output.strip():
        raise UsageError(f"--output needs a file name, e.g. --output model.safetensors; got {output!r}")
    if os.path.exists(output):
        raise UsageError(f"export: {output} already exists; pass --output with a new file name")
    state = model_state(ckpt.path)
    expected = ckpt.meta.get("param_shapes") or {}
    wrong = [f"{k}: {'missing' if k not in state else list(state[k].shape)} (recorded {shape})"
             for k, shape in sorted(expected.items()) if k not in state or list(state[k].shape) != shape]
    if wrong:
        raise RuntimeError(f"export: the weights gathered from {ckpt.path} do not match its recorded parameters "
                           f"({'; '.join(wrong[:3])}{' ...' if len(wrong) > 3 else ''}); nothing was written")
    # Own, contiguous storage for every tensor (safetensors refuses tied weights that share it).
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items() if torch.is_tensor(v)}
    task = {k: v for k, v in (ckpt.meta.get("compat") or {}).items() if k.startswith("task.")}
    metadata = {"format": "pt", "step": str(ckpt.step), "checkpoint": os.path.abspath(ckpt.path),
                "task": json.dumps(task, sort_keys=True)}
    folder = os.path.dirname(os.path.abspath(output))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".export-", suffix=".safetensors", dir=folder)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.link(tmp, output)  # fails, rather than replacing, if the name was taken meanwhile
    except FileExistsError:
        raise UsageError(f"export: {output} already exists; pass --output with a new file name") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
    values = sum(t.numel() for t in tensors.values())
    print(f"wrote {output}: {len(tensors)} tensors, {values:,} values, from {ckpt.path} (step {ckpt.step})")
    print(f"load it with: task.model.load_state_dict(safetensors.torch.load_file({output!r}))")
    return output
