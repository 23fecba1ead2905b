"""Checkpoints that count only once complete, exact resume, rotation (last K + best).

Layout: `<run_dir>/checkpoints/step_<N:08d>/`

  model.safetensors, optimizer.bin, ...  `accelerator.save_state` (DDP: written by the main process;
                                         DeepSpeed / FSDP: every rank writes its shard)
  rng_<rank>.pt                          python, numpy, torch (and CUDA) RNG states of every rank
  state.json                             TrainState, LR scheduler (incl. plateau), RunSummary, tracker run id
  meta.json                              step, epoch, reason, validation metrics, world size, distributed
                                         type, the recipe values that matter and the model's parameter shapes
  COMPLETE                               manifest {file: size} and {file: sha256}, written and fsynced last

Every rank writes into `checkpoints/.tmp-step_<N>/`; once all have finished, the main process writes
the manifest, fsyncs and renames the folder to `step_<N>` (`os.replace`), then deletes old ones.
A folder without a valid manifest, or with a file whose size or SHA-256 differs from it, is never
loaded: `--resume auto` falls back to the newest intact one, and refuses (exit 2) when a run has
checkpoints but none is intact. Everything is loaded with
`torch.load(weights_only=True)` or safetensors; state.json and meta.json are plain JSON.

The manifest, finding intact checkpoints and rotation's choice are launcher.checkpoint_files (no
torch); this module saves and loads. List a run's checkpoints: `python -m launcher.checkpoint
runs/NAME`; check every file against its hash: `python -m launcher.checkpoint verify runs/NAME`
(exit 1 if any checkpoint is damaged).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
from typing import Any

import numpy as np
import torch

from launcher.checkpoint_files import (
    CHECKPOINTS,
    FORMAT_VERSION,
    MARKER,
    TMP_PREFIX,
    Checkpoint,
    _fsync_dir,
    _write_json,
    checkpoint_name,
    inspect,
    latest,
    main,
    named_checkpoint,
    newest_intact,
    scan,
    select_kept,
    sha256_file,
    verify,
    write_manifest,
)
from launcher.config import CheckpointConfig, Config, training_keys
from launcher.errors import UsageError
from launcher.output import main_print
from launcher.resharding import (
    check_world_size,
    distributed_type,
    engine_layout,
    global_batch,
    load_other_world_size,
    rng_file,
)

__all__ = ["CHECKPOINTS", "ELASTIC", "FORMAT_VERSION", "MARKER", "RESUME_MAY_CHANGE", "TMP_PREFIX", "Checkpoint",
           "Checkpointer", "checkpoint_name", "cli", "compat_defaults", "compat_values", "inspect", "latest", "main",
           "newest_intact", "param_shapes", "resolve_resume", "rng_state", "scan", "select_kept", "set_rng_state",
           "sha256_file", "verify"]

RESUME_MAY_CHANGE = ("train.mixed_precision",)
"""Keys that change what a run learns (launcher.config.affects_training) but may differ on resume:
the precision follows the hardware a requeued job lands on."""
ELASTIC = ("train.batch_size", "train.grad_accum_steps")


def compat_values(cfg: Config, num_train_samples: int) -> dict[str, Any]:
    """The recipe values that must be equal to continue the same trajectory: those that change what a
    run learns (launcher.config.training_keys, the one source compare groups by too), plus the data size."""
    values = {k: v for k, v in training_keys(cfg).items() if k not in RESUME_MAY_CHANGE}
    values["data.num_train_samples"] = num_train_samples
    return values


def compat_defaults() -> dict[str, Any]:
    """The default value of every key that matters for resuming (JSON-safe)."""
    return {k: v for k, v in training_keys(Config()).items() if k not in RESUME_MAY_CHANGE}


def param_shapes(model: torch.nn.Module) -> dict[str, list[int]]:
    """Parameter name -> shape of the model inside any DDP / DeepSpeed / torch.compile wrapper."""
    # (accelerator.unwrap_model would do, but it imports deepspeed: a second per process.)
    while isinstance(getattr(model, "module", None), torch.nn.Module) or hasattr(model, "_orig_mod"):
        model = getattr(model, "_orig_mod", None) or model.module
    # ZeRO-3 keeps a placeholder locally; the real shape is in ds_shape.
    return {name: list(getattr(p, "ds_shape", p.shape)) for name, p in model.named_parameters()}


# ---------------------------------------------------------------------------------------------
# RNG states
# ---------------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """This process's RNG states in types `torch.load(weights_only=True)` accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])



# ---------------------------------------------------------------------------------------------
# Saving and loading (every rank calls these together)
# ---------------------------------------------------------------------------------------------


def resolve_resume(resume: str, checkpoints_dir: str, accelerator) -> str | None:
    """The checkpoint `--resume` names; every rank must call it (the main process decides, the others
    get its answer). UsageError when there is none to take.

    `auto`: the newest intact checkpoint in `checkpoints_dir`; None (a fresh start) if there is no
    checkpoint at all; refused if there are checkpoints but none is intact. A path: a checkpoint
    folder, or a run / checkpoints folder (its newest intact checkpoint).
    """
    from launcher.output import agree

    return agree(accelerator, lambda: _find(resume, checkpoints_dir))


def _find(resume: str, checkpoints_dir: str) -> tuple[str | None, str | None]:
    """(path, None), (None, None) for a fresh start, or (None, the one-line refusal)."""
    ckpt, problem, skipped = named_checkpoint(checkpoints_dir if resume == "auto" else resume)
    if problem is not None:
        return None, (f"--resume: checkpoint {resume!r} is not usable: {problem}; "
                      f"pass --resume auto or an earlier checkpoint")
    if ckpt is None and skipped:  # a fresh start would train over the run's own metrics
        path, problem = skipped[0]
        folder = os.path.dirname(path)
        return None, (f"--resume {resume}: none of the {len(skipped)} checkpoint(s) in {folder} is intact "
                      f"(newest, {os.path.basename(path)}: {problem}); nothing was changed; see "
                      f"python -m launcher.checkpoint verify {os.path.dirname(folder)}, then resume from a copy "
                      f"of a good checkpoint or start a fresh run in another --output_dir")
    for path, problem in skipped:
        print(f"warning: skipping checkpoint {path}: {problem}", file=sys.stderr, flush=True)
    if ckpt is None and resume != "auto":
        return None, (f"--resume: no complete checkpoint in {resume!r}; pass a run directory, a "
                      f"checkpoints/step_N folder, or --resume auto to start fresh when there is none")
    return (ckpt.path if ckpt else None), None


class Checkpointer:
    """Saves and loads `step_N` checkpoints; every rank must call `save`, `resolve` and `load` together."""

    def __init__(self, cfg: CheckpointConfig, run_dir: str, accelerator, model: torch.nn.Module,
                 compat: dict[str, Any], on_save=None, optimizer=None):
        self.cfg = cfg
        self.dir = os.path.join(run_dir, CHECKPOINTS)
        self.accelerator = accelerator
        self.model = model
        self.optimizer = optimizer
        """Needed to load a checkpoint written by another number of processes."""
        self.compat = compat
        self.on_save = on_save
        """Called on the main process as `on_save(step, tmp_path)` while a checkpoint is half written."""
        self.new_global_batch = False
        """Accept a checkpoint of another global batch (`--new_global_batch`); refused otherwise."""
        self.loaded_global_batch: int | None = None
        """Set by `load`: the checkpoint's global batch."""
        self.elastic: str | None = None
        """Set by `check_compatible`: how the resumed run differs in processes / global batch, or None."""
        self.last_saved: str | None = None
        self._warned_metric = False

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def _print(self, message: str) -> None:
        main_print(self.accelerator, message, stderr=True)

    def due(self, step: int, step_in_epoch: int, steps_per_epoch: int, total_steps: int) -> bool:
        """A step checkpoint now? Not at an epoch's last step: the end-of-epoch one follows the evaluation."""
        n = self.cfg.every_n_steps
        return (self.cfg.enabled and n > 0 and step % n == 0 and step_in_epoch < steps_per_epoch
                and step < total_steps)

    # -- save ------------------------------------------------------------------------------------
    def save(self, step: int, epoch: float, state: dict[str, Any], metrics: dict[str, float] | None = None,
             reason: str = "step") -> str:
        acc = self.accelerator
        name = checkpoint_name(step)
        tmp = os.path.join(self.dir, TMP_PREFIX + name)
        final = os.path.join(self.dir, name)
        self._check_finite(step)
        if self.is_main:
            os.makedirs(self.dir, exist_ok=True)
            for entry in os.scandir(self.dir):  # leftovers of saves that were killed
                if entry.name.startswith(TMP_PREFIX) and entry.is_dir():
                    shutil.rmtree(entry.path)
            os.makedirs(tmp)
        # Other ranks write their files into tmp: it must exist, and be cleared, before they start.
        acc.wait_for_everyone()
        acc.save_state(tmp, safe_serialization=True)
        torch.save(rng_state(), os.path.join(tmp, f"rng_{acc.process_index}.pt"))
        if self.is_main:
            _write_json(os.path.join(tmp, "state.json"), state)
            _write_json(os.path.join(tmp, "meta.json"), {
                "format_version": FORMAT_VERSION, "step": step, "epoch": epoch, "reason": reason,
                "metrics": metrics or {}, "world_size": acc.num_processes,
                "distributed_type": distributed_type(acc), **engine_layout(acc), "compat": self.compat,
                "param_shapes": param_shapes(self.model)})
        if self.on_save is not None and self.is_main:
            self.on_save(step, tmp)
        # The manifest may list the files only once every rank has finished writing its own.
        acc.wait_for_everyone()
        if self.is_main:
            self._commit(tmp, final, step)
            self._rotate()
        # No rank may move on (and e.g. exit after preemption, making the launcher kill the main
        # process) before the checkpoint has been renamed into place.
        acc.wait_for_everyone()
        self.last_saved = final
        return final

    def _check_finite(self, step: int) -> None:
        """Refuse to checkpoint NaN/inf weights (they would replace a good checkpoint in the rotation)."""
        acc = self.accelerator
        # Each rank checks what it holds (FSDP2: its shards of the DTensors), the sum says if any is bad.
        params = [p for p in (_local(p.detach()) for p in self.model.parameters()) if p.numel()]
        bad = torch.stack([~torch.isfinite(p).all() for p in params]).any().float().reshape(1) if params \
            else torch.zeros(1, device=acc.device)
        if acc.num_processes > 1:
            bad = acc.reduce(bad.to(acc.device), reduction="sum")
        if bad.item() > 0:
            raise RuntimeError(f"step {step}: the model has non-finite weights; not checkpointing them "
                               f"(last good checkpoint: {self.last_saved or 'none'})")

    def _commit(self, tmp: str, final: str, step: int) -> None:
        write_manifest(tmp, step)
        stale = None
        if os.path.exists(final):  # the same step saved again (e.g. preempted right after a resume)
            stale = os.path.join(self.dir, f"{TMP_PREFIX}old-{os.path.basename(final)}")
            os.replace(final, stale)
        os.replace(tmp, final)
        _fsync_dir(self.dir)
        if stale:
            shutil.rmtree(stale)

    def _rotate(self) -> None:
        complete = [ckpt for _, ckpt, _ in scan(self.dir) if ckpt is not None]
        mode = self.cfg.best_mode if self.cfg.keep_best else None
        entries = [(c.step, c.metric(self.cfg.best_metric)) for c in complete]
        if mode and any(c.meta.get("metrics") for c in complete) and all(v is None for _, v in entries) \
                and not self._warned_metric:
            self._warned_metric = True
            self._print(f"warning: checkpoint.best_metric {self.cfg.best_metric!r} is not a validation metric of "
                        f"this task (have: {', '.join(sorted(complete[0].meta['metrics']))}); no best checkpoint is kept")
        keep = select_kept(entries, self.cfg.keep_last, mode)
        for c in complete:
            if c.step not in keep:
                shutil.rmtree(c.path, ignore_errors=True)

    # -- resume ----------------------------------------------------------------------------------
    def resolve(self, resume: str) -> str | None:
        """The checkpoint to resume from (the main process decides, every rank gets the answer); see
        `resolve_resume`."""
        return resolve_resume(resume, self.dir, self.accelerator)

    def check_compatible(self, path: str) -> dict[str, Any]:
        """meta.json of `path`, or UsageError saying what differs from this run."""
        with open(os.path.join(path, "meta.json")) as f:
            meta = json.load(f)
        name = os.path.basename(path)
        self.elastic = check_world_size(name, meta, self.compat, self.accelerator, self.new_global_batch)
        old, new = meta["compat"], self.compat
        # A key the checkpoint does not know (written before the key existed) matches its default; a key
        # it holds that no longer matters (e.g. from an older list) is not compared.
        defaults = compat_defaults()
        old = {**{k: v for k, v in defaults.items() if k not in old}, **old}
        diffs = [f"{k} {old.get(k, '(unset)')!r} -> {new[k]!r}"
                 for k in sorted(new) if old.get(k) != new[k] and k not in ELASTIC]
        if diffs:
            raise UsageError(f"--resume: {name} was trained with different recipe values ({'; '.join(diffs)}); "
                             f"resume with the run's own config.yaml as --recipe, or start a fresh run in "
                             f"another --output_dir")
        shapes = param_shapes(self.model)
        saved = meta["param_shapes"]
        wrong = [f"{k} {saved.get(k)} -> {shapes.get(k)}" for k in sorted(set(saved) | set(shapes))
                 if saved.get(k) != shapes.get(k)]
        if wrong:
            more = f" (+{len(wrong) - 3} more)" if len(wrong) > 3 else ""
            raise UsageError(f"--resume: the model's parameters differ from {name}: {'; '.join(wrong[:3])}{more}; "
                             f"resume with the same task.model and task.options")
        return meta

    def load(self, path: str) -> dict[str, Any]:
        """Check compatibility, load model / optimizer / scaler / RNG on every rank, return state.json."""
        meta = self.check_compatible(path)
        acc = self.accelerator
        same = meta["world_size"] == acc.num_processes
        if same:
            acc.load_state(path)
        else:  # replicated, FSDP's DCP shards or DeepSpeed ZeRO (check_compatible refuses the rest)
            load_other_world_size(acc, self.model, self.optimizer, path)
        set_rng_state(torch.load(rng_file(path, acc.process_index, same), weights_only=True))
        with open(os.path.join(path, "state.json")) as f:
            state = json.load(f)
        self.loaded_global_batch = global_batch(meta["compat"], int(meta["world_size"]))
        self.last_saved = path
        return state


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a sharded (DTensor) parameter; the tensor itself otherwise."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def cli() -> None:
    from launcher.errors import run_cli

    run_cli(main, name="launcher.checkpoint", positional=2)  # RUN_DIR, or verify|export RUN_DIR


if __name__ == "__main__":
    cli()
