"""Checkpoint folders on disk: the COMPLETE manifest and its hashes, finding intact checkpoints,
choosing which to keep, and the command line that lists and verifies a run's checkpoints.

Pure file-system code: no torch, no distributed state (saving and loading are launcher.checkpoint).
A `step_N` folder counts only with a manifest `{file: size}` and `{file: sha256}` written and
fsynced last; a folder without a valid manifest, or with a file whose size or SHA-256 differs from
it, is never loaded.

List a run's checkpoints: `python -m launcher.checkpoint runs/NAME`; check every file against its
hash: `python -m launcher.checkpoint verify runs/NAME` (exit 1 if any checkpoint is damaged); the
model weights as one file: `python -m launcher.checkpoint export runs/NAME` (launcher.weights).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from typing import Any

from launcher.errors import UsageError

FORMAT_VERSION = 1
CHECKPOINTS = "checkpoints"
MARKER = "COMPLETE"
TMP_PREFIX = ".tmp-"
_STEP_DIR = re.compile(r"^step_(\d{8,})$")


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


@dataclass
class Checkpoint:
    path: str
    step: int
    meta: dict[str, Any]

    def metric(self, name: str) -> float | None:
        value = (self.meta.get("metrics") or {}).get(name)
        return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def sha256_file(path: str, chunk_size: int = 1 << 22, fsync: bool = False) -> str:
    """The file's SHA-256 (hex); with `fsync`, the file is also flushed to disk."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
        if fsync:
            os.fsync(f.fileno())
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


def named_checkpoint(target: str) -> tuple[Checkpoint | None, str | None, list[tuple[str, str]]]:
    """The checkpoint a path names: a `step_N` folder (checked, hashes included) or a run directory or
    its checkpoints/ folder (the newest intact checkpoint in it). Returns (the checkpoint or None,
    what is wrong with a named step folder, the (path, problem) of newer damaged ones skipped)."""
    path = os.path.abspath(target)
    if _STEP_DIR.match(os.path.basename(path)) or os.path.isfile(os.path.join(path, "meta.json")):
        ckpt, problem = inspect(path, verify=True)
        return ckpt, problem, []
    folder = os.path.join(path, CHECKPOINTS) if os.path.isdir(os.path.join(path, CHECKPOINTS)) else path
    ckpt, skipped = newest_intact(folder)
    return ckpt, None, skipped


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



def write_manifest(folder: str, step: int) -> None:
    """Fsync every file in `folder`, then write and fsync the COMPLETE manifest (sizes and SHA-256)."""
    files, hashes = {}, {}
    for root, _, names in os.walk(folder):
        for file in names:
            path = os.path.join(root, file)
            rel = os.path.relpath(path, folder)
            hashes[rel] = sha256_file(path, fsync=True)
            files[rel] = os.path.getsize(path)
    _write_json(os.path.join(folder, MARKER), {"format_version": FORMAT_VERSION, "step": step, "files": files,
                                               "sha256": hashes})
    _fsync_dir(folder)


# ---------------------------------------------------------------------------------------------
# CLI: list a run's checkpoints
# ---------------------------------------------------------------------------------------------


def _folder(run_dir: str) -> str:
    folder = os.path.join(run_dir, CHECKPOINTS) if os.path.isdir(os.path.join(run_dir, CHECKPOINTS)) else run_dir
    if not os.path.isdir(folder):
        raise UsageError(f"{run_dir!r} is not a run directory; pass e.g. runs/mnist1d-20250101-120000")
    return folder


def main(run_dir: str, target: str | None = None, output: str | None = None) -> None:
    """List the checkpoints of a run: step, epoch, why it was written, metrics, and whether it is usable.

    `python -m launcher.checkpoint RUN_DIR` lists them (files checked by size);
    `python -m launcher.checkpoint verify RUN_DIR` also checks every file against the SHA-256 in its
    checkpoint's manifest and exits with status 1 if any checkpoint is damaged;
    `python -m launcher.checkpoint export RUN_DIR|CHECKPOINT [--output FILE]` writes the model weights
    of the newest intact (or the named) checkpoint as one safetensors file, whatever engine wrote them
    (one process, DDP, FSDP, DeepSpeed ZeRO).

    Args:
      run_dir: a run directory (holding checkpoints/) or its checkpoints/ folder; or `verify` or `export`.
      target: with `verify`, the run directory; with `export`, a run directory or a step_N checkpoint.
      output: with `export`, the file to write (default: RUN_DIR/model-step_N.safetensors; never overwritten).
    """
    if run_dir == "verify" and target is not None and output is None:
        raise SystemExit(verify(target))
    if run_dir == "export" and target is not None:
        from launcher.weights import export

        export(target, output)
        return
    if target is not None or output is not None:
        extra = repr(target) if target is not None else "--output"
        raise UsageError(f"unexpected argument {extra}; use python -m launcher.checkpoint [verify|export] RUN_DIR "
                         f"(--output only with export)")
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
