"""Evaluation: metrics over the whole validation set, the same numbers on every rank, in one all-reduce."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


@torch.no_grad()
def evaluate(model, val_loader, split: Callable[[Any], tuple[Any, Any]], task, accelerator, lr: float,
             preempt_requested: bool, epoch: int) -> tuple[dict[str, float], bool]:
    """(`val/<metric>` means, whether some rank was asked to stop).

    Each rank sums the per-sample metrics of its real samples (launcher.data.EvalLoader), and one
    all-reduce adds the sums, the preemption flags and the ranks' LRs (which must agree: a plateau
    decision taken on per-rank metrics would make them differ; a disagreement raises).
    """
    model.eval()
    sums: dict[str, torch.Tensor] = {}
    for batch, num_valid in val_loader:
        inputs, targets = split(batch)
        for name, values in task.metrics(model(inputs), targets).items():
            total = (values if num_valid >= len(values) else values[:num_valid]).double().sum()
            sums[name] = sums[name] + total if name in sums else total
    n, device = accelerator.num_processes, accelerator.device
    packed = torch.stack([*(v.to(device) for v in sums.values()),
                          torch.tensor(float(preempt_requested), dtype=torch.float64, device=device),
                          torch.tensor(lr, dtype=torch.float64, device=device)])
    if n > 1:
        torch.distributed.all_reduce(packed)
    values = packed.tolist()
    if abs(values[-1] - n * lr) > 1e-9 * n * lr:
        raise RuntimeError(f"ranks disagree on the LR at epoch {epoch}: {lr} here, {values[-1] / n} on average")
    count = val_loader.num_samples
    means = {f"val/{k}": v / count for k, v in zip(sums, values)}
    if task.finalize is not None:
        means.update({f"val/{k}": v for k, v in task.finalize(
            {k.removeprefix("val/"): v for k, v in means.items()}).items()})
    model.train()
    return means, values[-2] > 0
