"""Non-finite steps without a host sync: skip on the device, decide to stop at the next flush.

The clipped global gradient norm is the same number on every rank (DDP, FSDP and ZeRO reduce the
gradients before it is taken; a NaN loss on one rank poisons everyone's reduced gradients), so each
rank can decide on its own, on the device, whether a step is non-finite, and all of them decide the
same. The fused AdamW/Adam/SGD kernels take a `found_inf` tensor and skip the update on the device
when it is 1 (parameters, moments and the step count are left bit-identical: pytorch#88015, the
mechanism GradScaler uses), so the loop never waits for the answer.

Policies (`train.on_nonfinite`, `train.max_nonfinite_skips`):
  skip   a non-finite update is skipped on the device; `max_nonfinite_skips` in a row freeze the
         weights (every later update is skipped too) until the run stops at the next flush;
  stop   nothing per step: the run stops at the next flush after the first non-finite step. The
         updates in between are not undone (the weights in memory may be NaN), but nothing after the
         last good step is ever saved: every checkpoint reads the rows back first and stops there.
The host learns what happened when the step rows are read back (every `train.log_every_n_steps`
steps, before each checkpoint and at epoch ends). `decide` replays the same rule on the read-back norms.

Where no device skip is possible (a non-fused optimizer, `optim.fused: false`), the norm is read
back every step (one host sync, no collective) and the update is skipped on the host. With an fp16
gradient scaler, overflowing gradients are the scaler's business (it skips the step itself and
lowers the scale); only a non-finite loss counts. Under DeepSpeed the engine steps inside
`backward`, so a bf16/fp32 non-finite step cannot be undone: it is reported, and stops the run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass
class Event:
    """A non-finite step, as the host learns of it at a flush."""

    step: int
    loss_ranks: int
    """On how many ranks the loss itself was non-finite (0: only the gradients)."""
    consecutive: int
    stop: bool

    def message(self, train, num_processes: int, last_checkpoint: str | None) -> str:
        """The line the main process prints: a warning for a skip, an error with the fix for a stop."""
        what = (f"step {self.step}: non-finite loss on {self.loss_ranks} of {num_processes} process(es)"
                if self.loss_ranks else f"step {self.step}: non-finite gradients")
        if not self.stop:
            return f"warning: {what}: step skipped ({self.consecutive} in a row; stop at {train.max_nonfinite_skips})"
        why, fix = ("train.on_nonfinite=stop", " (or --train.on_nonfinite=skip)") if train.on_nonfinite == "stop" \
            else (f"{self.consecutive} consecutive skips = train.max_nonfinite_skips", "")
        return (f"error: {what}: stopping ({why}); nothing after step {self.step - 1} was saved and the last "
                f"checkpoint ({last_checkpoint or 'none'}) is intact; lower optim.lr or set "
                f"optim.clip_grad_norm{fix}, then --resume auto")


@dataclass
class NonFiniteGuard:
    on_nonfinite: str
    max_skips: int
    device: torch.device
    torch_optimizer: torch.optim.Optimizer | None = None
    """The plain torch optimizer when the trainer steps it itself (no DeepSpeed engine)."""
    scaler: bool = False
    consecutive: int = 0
    """Host view: non-finite steps in a row up to the last flush."""
    _found_inf: torch.Tensor | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        opt = self.torch_optimizer
        # `stop` needs no per-step work: the run stops at the next flush and nothing after the bad step
        # is ever saved (a checkpoint always flushes first). `skip` must undo the update where it happens.
        skipping = opt is not None and not self.scaler and self.on_nonfinite == "skip"
        self.device_skip = bool(skipping and any(g.get("fused") for g in opt.param_groups))
        self.host_skip = skipping and not self.device_skip
        self.per_step = self.device_skip or self.host_skip
        """Whether `before_step` has anything to do (`stop`, and fp16 with a scaler, need nothing per step)."""
        if self.device_skip:
            self._found_inf = torch.zeros((), dtype=torch.float32, device=self.device)
            self._consecutive = torch.zeros((), dtype=torch.int32, device=self.device)
            self._frozen = torch.zeros((), dtype=torch.bool, device=self.device)
            self._bad = torch.zeros((), dtype=torch.bool, device=self.device)
            self._inf = torch.full((), math.inf, device=self.device)
            opt.found_inf = self._found_inf  # read by the fused kernels at every step()
        self._host_consecutive = 0
        self._host_frozen = False
        self.norm_known = False

    def before_step(self, grad_norm: torch.Tensor | None) -> bool:
        """Between clipping and `optimizer.step()` when `per_step`. Returns False when the host must not step."""
        if grad_norm is None:
            return True
        if self.device_skip:
            # NaN or inf (a norm is never -inf): 2 kernels into preallocated buffers, not isfinite's 4.
            bad = torch.lt(grad_norm, self._inf, out=self._bad).logical_not_()
            self._consecutive.add_(1).mul_(bad)
            self._frozen.logical_or_(self._consecutive >= self.max_skips)  # the run stops at the next flush
            torch.logical_or(bad, self._frozen, out=self._found_inf)
            return True
        if self.host_skip:  # one host read per step: no fused kernel to skip on the device
            bad = not math.isfinite(float(grad_norm))
            self._host_consecutive = self._host_consecutive + 1 if bad else 0
            self._host_frozen |= bad and self._host_consecutive >= self.max_skips
            return not (bad or self._host_frozen)
        return True

    def saw_norms(self, norms: list) -> None:
        """At a flush, the steps' norms as measured (None where the engine gave none)."""
        if not self.norm_known:
            self.norm_known = any(norm is not None for norm in norms)

    def decide(self, steps, loss_bad_ranks: list[float], norms: list[float]) -> list[Event]:
        """Replay the policy over the read-back steps; the events up to and including a stop.

        Where the update was skipped by the gradient norm (on the device or the host), the norm alone
        decides, as it did in the step; otherwise a non-finite loss on any rank, or a non-finite norm
        where one was measured and no fp16 scaler owns overflows.
        """
        by_norm = self.device_skip or self.host_skip
        events = []
        for step, loss_ranks, norm in zip(steps, loss_bad_ranks, norms):
            norm_bad = self.norm_known and not self.scaler and not math.isfinite(norm)
            bad = norm_bad if by_norm else (loss_ranks > 0 or norm_bad)
            if not bad:
                self.consecutive = 0
                continue
            self.consecutive += 1
            stop = self.on_nonfinite == "stop" or self.consecutive >= self.max_skips
            events.append(Event(step, int(loss_ranks), self.consecutive, stop))
            if stop:
                break
        return events
