"""Pieces the built-in tasks share: classification loss and metrics, and an atomic array cache."""

from __future__ import annotations

import contextlib
import os
import tempfile

import numpy as np
import torch
import torch.nn.functional as F

ARRAY_KEYS = ("x", "y", "x_test", "y_test")


def classification_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy, computed in fp32 whatever precision the model ran in."""
    return F.cross_entropy(logits.float(), targets)


def classification_metrics(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-sample cross-entropy and top-1 correctness (the trainer averages them over the val set)."""
    logits = logits.float()
    return {
        "loss": F.cross_entropy(logits, targets, reduction="none"),
        "accuracy": (logits.argmax(-1) == targets).float(),
    }


def save_arrays(path: str, arrays: dict[str, np.ndarray]) -> None:
    """Write an .npz under a temporary name and rename it: concurrent readers never see half a file."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".npz.tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def load_arrays_npz(path: str) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {k: data[k] for k in ARRAY_KEYS}
