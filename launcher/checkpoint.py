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

List a run's checkpoints: `python -m launcher.checkpoint runs/NAME`; check every file against its
hash: `python -m launcher.checkpoint verify runs/NAME` (exit 1 if any checkpoint is damaged).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import shutil
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from launcher.config import CheckpointConfig, Config, training_keys
from launcher.errors import UsageError
from launcher.resharding import (
    check_world_size,
    distributed_type,
    global_batch,
    load_other_world_size,
    rng_file,
)

FORMAT_VERSION = 1
CHECKPOINTS = "checkpoints"
MARKER = "COMPLETE"
TMP_PREFIX = ".tmp-"
_STEP_DIR = re.compile(r"^step_(\d{8,})$")

RESUME_MAY_CHANGE = ("train.mixed_precision",)
"""Keys that change what a run learns (launcher.config.affects_training) but may differ on resume:
the precision follows the hardware a requeued job lands on."""
ELASTIC = ("train.batch_size", "train.grad_accum_steps")


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


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
# Finding checkpoints (pure file-system code, no distributed state)
# ---------------------------------------------------------------------------------------------


@dataclass
class Checkpoint:
    path: str
    step: int
    meta: dict[str, Any]

    def metric(self, name: str) -> float | None:
        value = (self.meta.get("metrics") or {}).get(name)
        return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def sha256_file(path: str, chunk_size: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def inspect(path: str, verify: bool = True) -> tuple[Checkpoint | None, str | None]:
    """(checkpoint, None) if `path` is complete and intact, else (None, what is wrong).

    Complete: the manifest is there and every file it lists has its size. With `verify`, every file's
    SHA-256 is also checked against the manifest (manifests written before hashes were recorded are
    checked by size only).
    """
    marker = os.path.join(path, MARKER)
    if not os.path.isfile(marker):
        return None, f"no {MARKER} manifest (interrupted while being written)"
    try:
        with open(marker) as f:
            manifest = json.load(f)
        with open(os.path.join(path, "meta.json")) as f:
            meta = json.load(f)
    except (OSError, ValueError) as err:
        return None, f"unreadable manifest or meta.json ({err})"
    for rel, size in manifest.get("files", {}).items():
        file = os.path.join(path, rel)
        if not os.path.isfile(file):
            return None, f"{rel} is missing"
        if os.path.getsize(file) != size:
            return None, f"{rel} has {os.path.getsize(file)} bytes, the manifest says {size}"
    if verify:
        hashes = manifest.get("sha256")
        if hashes is not None and set(hashes) != set(manifest.get("files", {})):
            return None, "the manifest's hashes do not cover its files"
        for rel, expected in sorted((hashes or {}).items()):
            if sha256_file(os.path.join(path, rel)) != expected:
                return None, f"{rel} does not match its SHA-256 in the manifest (altered or corrupt)"
    if meta.get("format_version") != FORMAT_VERSION:
        return None, f"format version {meta.get('format_version')} (this code reads {FORMAT_VERSION})"
    return Checkpoint(path=path, step=int(meta["step"]), meta=meta), None


def scan(checkpoints_dir: str, verify: bool = False) -> list[tuple[str, Checkpoint | None, str | None]]:
    """All `step_N` folders, newest first, each with its checkpoint or what is wrong with it.

    Sizes only by default (cheap: rotation scans after every save); `verify` also checks the hashes.
    """
    if not os.path.isdir(checkpoints_dir):
        return []
    found = []
    for entry in os.scandir(checkpoints_dir):
        match = _STEP_DIR.match(entry.name)
        if match and entry.is_dir():
            found.append((int(match.group(1)), entry.path))
    return [(path, *inspect(path, verify)) for _, path in sorted(found, reverse=True)]


def newest_intact(checkpoints_dir: str) -> tuple[Checkpoint | None, list[tuple[str, str]]]:
    """The newest complete checkpoint whose files match their hashes, and the (path, problem) of the
    newer ones that were skipped. Older checkpoints are not read once one is found."""
    skipped = []
    for path, ckpt, problem in scan(checkpoints_dir):
        if ckpt is not None:
            ckpt, problem = inspect(path, verify=True)
        if ckpt is not None:
            return ckpt, skipped
        skipped.append((path, problem))
    return None, skipped


def latest(checkpoints_dir: str, warn=None) -> Checkpoint | None:
    """The newest intact checkpoint; incomplete or damaged ones are reported to `warn` and skipped."""
    ckpt, skipped = newest_intact(checkpoints_dir)
    if warn is not None:
        for path, problem in skipped:
            warn(f"skipping checkpoint {path}: {problem}")
    return ckpt


def select_kept(entries: list[tuple[int, float | None]], keep_last: int, best_mode: str | None) -> set[int]:
    """Steps to keep among (step, metric) pairs: the last `keep_last`, plus the best metric if best_mode.

    Ties go to the earliest step (the first time the value was reached).
    """
    steps = sorted(step for step, _ in entries)
    keep = set(steps[-keep_last:]) if keep_last > 0 else set()
    scored = [(value if best_mode == "min" else -value, step) for step, value in entries
              if value is not None and math.isfinite(value)]
    if best_mode and scored:
        keep.add(min(scored)[1])
    return keep


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: str, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


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
    from launcher.distributed import agree

    return agree(accelerator, lambda: _find(resume, checkpoints_dir))


def _find(resume: str, checkpoints_dir: str) -> tuple[str | None, str | None]:
    """(path, None), (None, None) for a fresh start, or (None, the one-line refusal)."""
    if resume == "auto":
        return _newest(checkpoints_dir, "auto")
    path = os.path.abspath(resume)
    if _STEP_DIR.match(os.path.basename(path)) or os.path.isfile(os.path.join(path, "meta.json")):
        ckpt, problem = inspect(path, verify=True)
        if ckpt is None:
            return None, (f"--resume: checkpoint {resume!r} is not usable: {problem}; "
                          f"pass --resume auto or an earlier checkpoint")
        return ckpt.path, None
    folder = os.path.join(path, CHECKPOINTS) if os.path.isdir(os.path.join(path, CHECKPOINTS)) else path
    found, problem = _newest(folder, resume)
    if found is None and problem is None:
        return None, (f"--resume: no complete checkpoint in {resume!r}; pass a run directory, a "
                      f"checkpoints/step_N folder, or --resume auto to start fresh when there is none")
    return found, problem


def _newest(folder: str, resume: str) -> tuple[str | None, str | None]:
    """The newest intact checkpoint in `folder` (one warning line per newer damaged one); a refusal
    when there are checkpoints but none is intact (a fresh start would train over the run's metrics)."""
    ckpt, skipped = newest_intact(folder)
    if ckpt is None and skipped:
        path, problem = skipped[0]
        run = os.path.dirname(folder.rstrip(os.sep))
        return None, (f"--resume {resume}: none of the {len(skipped)} checkpoint(s) in {folder} is intact "
                      f"(newest, {os.path.basename(path)}: {problem}); nothing was changed; see "
                      f"python -m launcher.checkpoint verify {run}, then resume from a copy of a good "
                      f"checkpoint or start a fresh run in another --output_dir")
    for path, problem in skipped:
        print(f"warning: skipping checkpoint {path}: {problem}", file=sys.stderr, flush=True)
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
        if self.is_main:
            print(message, file=sys.stderr, flush=True)

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
                "distributed_type": distributed_type(acc), "compat": self.compat,
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
        params = [p.detach() for p in self.model.parameters() if p.numel()]
        bad = torch.stack([~torch.isfinite(p).all() for p in params]).any().float().reshape(1) if params \
            else torch.zeros(1, device=acc.device)
        if acc.num_processes > 1:
            bad = acc.reduce(bad.to(acc.device), reduction="sum")
        if bad.item() > 0:
            raise RuntimeError(f"step {step}: the model has non-finite weights; not checkpointing them "
                               f"(last good checkpoint: {self.last_saved or 'none'})")

    def _commit(self, tmp: str, final: str, step: int) -> None:
        files, hashes = {}, {}
        for root, _, names in os.walk(tmp):
            for file in names:
                path = os.path.join(root, file)
                digest = hashlib.sha256()
                with open(path, "rb") as f:
                    while chunk := f.read(1 << 22):
                        digest.update(chunk)
                    os.fsync(f.fileno())
                rel = os.path.relpath(path, tmp)
                files[rel] = os.path.getsize(path)
                hashes[rel] = digest.hexdigest()
        _write_json(os.path.join(tmp, MARKER), {"format_version": FORMAT_VERSION, "step": step, "files": files,
                                                "sha256": hashes})
        _fsync_dir(tmp)
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
        else:  # replicated or DeepSpeed ZeRO-1/2 state (check_compatible refuses other sharded state)
            load_other_world_size(acc, self.model, self.optimizer, path)
        set_rng_state(torch.load(rng_file(path, acc.process_index, same), weights_only=True))
        with open(os.path.join(path, "state.json")) as f:
            state = json.load(f)
        self.loaded_global_batch = global_batch(meta["compat"], int(meta["world_size"]))
        self.last_saved = path
        return state


# ---------------------------------------------------------------------------------------------
# CLI: list a run's checkpoints
# ---------------------------------------------------------------------------------------------


def _folder(run_dir: str) -> str:
    folder = os.path.join(run_dir, CHECKPOINTS) if os.path.isdir(os.path.join(run_dir, CHECKPOINTS)) else run_dir
    if not os.path.isdir(folder):
        raise UsageError(f"{run_dir!r} is not a run directory; pass e.g. runs/mnist1d-20250101-120000")
    return folder


def main(run_dir: str, target: str | None = None) -> None:
    """List the checkpoints of a run: step, epoch, why it was written, metrics, and whether it is usable.

    `python -m launcher.checkpoint RUN_DIR` lists them (files checked by size);
    `python -m launcher.checkpoint verify RUN_DIR` also checks every file against the SHA-256 in its
    checkpoint's manifest and exits with status 1 if any checkpoint is damaged.

    Args:
      run_dir: a run directory (holding checkpoints/) or its checkpoints/ folder; or `verify`.
      target: with `verify`, the run directory.
    """
    if run_dir == "verify" and target is not None:
        raise SystemExit(verify(target))
    if target is not None:
        raise UsageError(f"unexpected argument {target!r}; use python -m launcher.checkpoint [verify] RUN_DIR")
    folder = _folder(run_dir)
    rows = scan(folder)
    if not rows:
        print(f"no checkpoints in {folder}")
        return
    newest = next((c.path for _, c, _ in rows if c is not None), None)
    for path, ckpt, problem in rows:
        if ckpt is None:
            print(f"{os.path.basename(path)}  NOT USABLE: {problem}")
            continue
        m = ckpt.meta
        metrics = "  ".join(f"{k} {v:.4f}" for k, v in (m.get("metrics") or {}).items())
        tag = "  <- --resume auto" if path == newest else ""
        print(f"{os.path.basename(path)}  epoch {m['epoch']:g}  {m['reason']}  {metrics}{tag}")


def verify(run_dir: str) -> int:
    """Check every checkpoint of a run against its manifest (sizes and SHA-256); 0 if all are intact, else 1."""
    folder = _folder(run_dir)
    rows = scan(folder, verify=True)
    if not rows:
        print(f"no checkpoints in {folder}")
        return 0
    newest = next((c.path for _, c, _ in rows if c is not None), None)
    for path, ckpt, problem in rows:
        if ckpt is None:
            print(f"{os.path.basename(path)}  DAMAGED: {problem}")
            continue
        with open(os.path.join(path, MARKER)) as f:
            manifest = json.load(f)
        how = "sha256 verified" if manifest.get("sha256") else "sizes only (no hashes in this manifest)"
        tag = "  <- --resume auto" if path == newest else ""
        print(f"{os.path.basename(path)}  ok  {len(manifest.get('files', {}))} files, {how}{tag}")
    damaged = sum(ckpt is None for _, ckpt, _ in rows)
    if damaged:
        verdict = f"--resume auto takes {os.path.basename(newest)}" if newest else "--resume auto would refuse"
        print(f"{damaged} of {len(rows)} checkpoint(s) damaged; {verdict}")
    return 1 if damaged else 0


def cli() -> None:
    from launcher.errors import run_cli

    run_cli(main, name="launcher.checkpoint", positional=2)  # RUN_DIR, or verify RUN_DIR


if __name__ == "__main__":
    cli()
