"""The step rows: what the training loop keeps of each optimizer step, and how it reads them back.

A step's loss and gradient norm stay on the device (no host sync) in `StepRows`, with the LRs the
step used. `read_back` turns every step since the last read-back into host numbers with one stack
and one read (one process) or one all-reduce and one read (several: the losses averaged over ranks,
per-step counts of ranks with a non-finite loss, and the preemption flag ride in the same tensor).
`metrics_rows` makes the `metrics.jsonl` rows; the trainer runs it in the metrics writer thread
unless an `on_flush` hook wants the rows.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from launcher.tracking import json_line


@dataclass
class StepRows:
    losses: list[torch.Tensor] = field(default_factory=list)
    """Each step's loss (the mean over its micro-batches), on the device."""
    norms: list[Any] = field(default_factory=list)
    """Each step's global gradient norm before clipping: a device tensor, or None where none was measured."""
    lrs: list[list[float]] = field(default_factory=list)
    """The LRs (one per param group) each step used."""

    def take(self) -> tuple[list[torch.Tensor], list[Any], list[list[float]]]:
        """The rows so far, leaving none."""
        out = self.losses, self.norms, self.lrs
        self.losses, self.norms, self.lrs = [], [], []
        return out


@dataclass
class ReadBack:
    losses: list[float]
    """Each step's loss, averaged over ranks."""
    loss_bad_ranks: list[float]
    """On how many ranks each step's loss was non-finite."""
    norms: list[float]
    """Each step's gradient norm (NaN where none was measured)."""
    preempt: bool
    """Some rank was asked to stop (several processes only: one process acts at the step in flight)."""


def read_back(losses: list[torch.Tensor], norms: list[Any], num_processes: int, device: torch.device,
              preempt_requested: bool) -> ReadBack:
    """One host read (and, for several processes, one all-reduce) for all of these steps. Every rank calls it."""
    p = len(losses)
    losses = [_scalar(v, device) for v in losses]
    norms = [_scalar(v, device) for v in norms]
    if num_processes == 1:  # nothing to agree on: one stack, one read
        values = torch.stack(losses + norms).tolist() if p else []
        return ReadBack(values[:p], [0.0 if math.isfinite(v) else 1.0 for v in values[:p]], values[p:], False)
    requested = torch.full((1,), float(preempt_requested), device=device)
    if p:
        stacked = torch.stack(losses)
        packed = torch.cat([stacked, torch.isfinite(stacked).logical_not_().float(), requested])
    else:
        packed = requested
    torch.distributed.all_reduce(packed)
    packed[:p] /= num_processes  # the mean loss over ranks, in float32 as each rank computed it
    if p:
        packed = torch.cat([packed, torch.stack(norms)])
    values = packed.tolist()  # the host read
    return ReadBack(values[:p], values[p:2 * p], values[2 * p + 1:], values[2 * p] > 0)


def metrics_rows(first: int, epoch: int, step_offset: int, steps_per_epoch: int, lrs: list[list[float]],
                 losses: list[float], norms: list[float]) -> list[dict[str, Any]]:
    """The metrics rows of steps first, first + 1, ...: step k is step k + step_offset of epoch `epoch`."""
    rows = []
    for step, step_lrs, loss, norm in zip(itertools.count(first), lrs, losses, norms):
        row = {"step": step, "epoch": round(epoch + (step + step_offset) / steps_per_epoch, 6), "lr": step_lrs[0],
               "train/loss": loss, "train/grad_norm": norm}
        if len(step_lrs) > 1:
            row.update({f"lr/group{i}": lr for i, lr in enumerate(step_lrs)})
        rows.append(row)
    return rows


def metrics_lines(first: int, epoch: int, step_offset: int, steps_per_epoch: int, lrs: list[list[float]],
                  losses: list[float], norms: list[float]) -> str:
    """`metrics_rows(...)` as metrics.jsonl lines, character for character what json.dumps writes for
    them (launcher.tracking), at a fraction of the cost: one format per row, no dict."""
    out = []
    for step, step_lrs, loss, norm in zip(itertools.count(first), lrs, losses, norms):
        if not (math.isfinite(loss) and math.isfinite(norm)):
            out.append(json_line(metrics_rows(step, epoch, step_offset, steps_per_epoch, [step_lrs], [loss], [norm])[0]))
            continue
        lr = repr(step_lrs[0])
        line = (f'{{"step": {step}, "epoch": {round(epoch + (step + step_offset) / steps_per_epoch, 6)!r}, '
                f'"lr": {lr}, "train/loss": {loss!r}, "train/grad_norm": {norm!r}')
        if len(step_lrs) > 1:  # param groups usually share the LR: one repr
            line += "".join(f', "lr/group{i}": {lr if g == step_lrs[0] else repr(g)}' for i, g in enumerate(step_lrs))
        out.append(line + "}\n")
    return "".join(out)


def _scalar(value: Any, device: torch.device) -> torch.Tensor:
    """A step's loss or gradient norm as a 0-d float32 tensor (NaN where no norm was measured)."""
    if isinstance(value, torch.Tensor):
        return value if value.dtype == torch.float32 and value.ndim == 0 else value.float().reshape(())
    return torch.full((), math.nan if value is None else float(value), device=device)
