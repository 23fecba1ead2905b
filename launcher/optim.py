"""Optimizer construction: AdamW (decoupled weight decay) with biases and norm weights excluded."""

from __future__ import annotations

import torch
from torch import nn

from launcher.config import OptimConfig

FUSED_DEVICES = ("cpu", "cuda", "xpu", "mps")
"""Devices with fused Adam/AdamW/SGD kernels in torch >= 2.4."""

_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.modules.batchnorm._NormBase)


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Two groups: `decay` (weights of linear/conv/embedding layers) and `no_decay` (biases, norms).

    With `decay_norm_and_bias` (or weight_decay 0) there is one group. Empty groups are dropped.
    """
    if cfg.decay_norm_and_bias or cfg.weight_decay == 0:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": cfg.weight_decay,
                 "name": "all"}]
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            if isinstance(module, _NORM_TYPES) or name.endswith("bias") or p.ndim < 2:
                no_decay.append(p)
            else:
                decay.append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay, "name": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, cfg: OptimConfig, base_lr: float, device_type: str) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg)
    for g in groups:
        g["lr"] = base_lr
    # The fused kernels also skip a non-finite update on the device (launcher.nonfinite).
    fused = cfg.fused and device_type in FUSED_DEVICES
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=base_lr, betas=cfg.betas, eps=cfg.eps, fused=fused or None)
    if cfg.name == "adam":
        return torch.optim.Adam(groups, lr=base_lr, betas=cfg.betas, eps=cfg.eps, fused=fused or None)
    return torch.optim.SGD(groups, lr=base_lr, momentum=cfg.momentum, fused=fused or None)
