"""The arithmetic of one optimizer step, through Accelerate only where Accelerate adds something."""

from __future__ import annotations

import contextlib
import math

import torch


class StepOps:
    """accumulate / backward / clip / step / zero_grad of one step, through Accelerate or straight to torch.

    Where Accelerate's wrappers would only add cost (no gradient scaler, no DeepSpeed / FSDP / XLA,
    a plain AcceleratedOptimizer), call torch directly: `AcceleratedOptimizer.step` looks for the
    `lomo_optim` package on disk twice per call and `zero_grad` calls `inspect.signature`,
    `clip_grad_norm_` checks the torch version and walks the parameters for DTensors, and
    `backward` divides the loss by 1 without accumulation. Together ~0.3 ms a step, ~10% of an
    MNIST-1D CNN step on CPU (bench/overhead.py). The arithmetic is the same either way.
    """

    def __init__(self, accelerator, optimizer, model, grad_accum_steps: int, clip_grad_norm: float):
        from accelerate.optimizer import AcceleratedOptimizer
        from accelerate.utils import DistributedType

        self.accelerator = accelerator
        self.optimizer = optimizer
        self.model = model
        self.max_norm = clip_grad_norm or math.inf
        plain = (type(optimizer) is AcceleratedOptimizer and getattr(accelerator, "scaler", None) is None
                 and accelerator.distributed_type in (DistributedType.NO, DistributedType.MULTI_CPU,
                                                      DistributedType.MULTI_GPU))
        self.torch_optimizer = optimizer.optimizer if plain else None
        self.params = [p for p in model.parameters() if p.requires_grad] if plain else None
        self.plain_backward = plain and grad_accum_steps == 1

    def accumulate(self):
        # Without accumulation (and outside DeepSpeed / FSDP) accelerate.accumulate only keeps
        # sync_gradients at its initial True, at ~20 us a step.
        return contextlib.nullcontext() if self.plain_backward else self.accelerator.accumulate(self.model)

    def backward(self, loss: torch.Tensor) -> None:
        if self.plain_backward:
            loss.backward()
        else:
            self.accelerator.backward(loss)

    def clip_grad_norm(self) -> torch.Tensor | None:
        """The global gradient norm before clipping (a plain tensor, the same on every rank), or None."""
        if self.params is not None:
            return torch.nn.utils.clip_grad_norm_(self.params, self.max_norm)
        norm = self.accelerator.clip_grad_norm_(self.model.parameters(), self.max_norm)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2 may return a DTensor

    def optimizer_step(self) -> None:
        (self.torch_optimizer or self.optimizer).step()

    def zero_grad(self) -> None:
        (self.torch_optimizer or self.optimizer).zero_grad(set_to_none=True)
