"""Byte-level language modelling with a small GPT (decoder-only transformer, vocabulary of 256 bytes).

The corpus is `task.options.text_file` if given, else the Python standard library's own source:
the sorted `*.py` files under `sysconfig.get_paths()['stdlib']` (no `site-packages`, no `test` or
`tests` directories), concatenated up to `max_bytes`. It is on every machine and needs no download;
it differs between Python versions, so compare runs made with the same interpreter. The last
`val_fraction` of the bytes is the validation split.

One training sample is a window of `block_size + 1` bytes (inputs and the targets shifted by one).
An epoch is `samples_per_epoch` windows: the training split is cut into that many equal slices
and sample i is a window starting at a random position in slice i, like a random crop. The
offset is a pure function of (train.seed, epoch, i) (`launcher.data.SampleRandom`), never of
torch's global RNG: an epoch covers the whole split, every epoch sees fresh windows (a small model
would otherwise memorise a fixed set within a few epochs), and a resumed run, mid-epoch or on
another number of processes, sees exactly the windows of an uninterrupted one. The validation set is up to `val_samples`
fixed, non-overlapping windows spread evenly over the validation split.

Metrics per sample: `loss` (mean next-byte cross-entropy over the window) and `accuracy`
(next-byte top-1); after averaging, `perplexity = exp(loss)` and `bits_per_byte = loss / ln 2`.
For throughput and MFU the task reports `tokens_per_sample = block_size` and `flops_per_token =
6 N + 12 n_layer n_embd block_size` (`GPT.flops_per_token`: N counts every parameter but the
positional embedding).

Options (`task.options`, `GPTOptions`): `n_layer`, `n_head`, `n_embd`, `block_size`, `dropout` (the
model); `text_file`, `max_bytes`, `val_fraction`, `samples_per_epoch`, `val_samples` (the data).
Model (`task.model`): `gpt` (the default and only one).
"""

from __future__ import annotations

import math
import os
import sysconfig
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import model_validator
from torch.utils.data import Dataset

from launcher.config import DataConfig, TaskConfig
from launcher.data import SampleRandom
from launcher.errors import UsageError
from launcher.models.gpt import GPT, GPTConfig
from launcher.tasks import Task, parse_options, problem, setting, task_options


@task_options
class GPTOptions:
    n_layer: int = setting(4, ge=1)
    """Transformer blocks."""
    n_head: int = setting(4, ge=1)
    """Attention heads per block; n_embd must be a multiple of it."""
    n_embd: int = setting(128, ge=1)
    """Width of the residual stream (embedding size)."""
    block_size: int = setting(128, ge=1)
    """Context length in bytes: one sample is block_size + 1 bytes (inputs and the targets shifted by one)."""
    dropout: float = setting(0.0, ge=0, lt=1)
    """Dropout probability (attention, residual and embedding)."""
    text_file: str = ""
    """The corpus: a text file read as bytes; empty = the Python standard library's source."""
    max_bytes: int = setting(8_000_000, ge=1)
    """Read at most this many bytes of the corpus."""
    val_fraction: float = setting(0.1, gt=0, lt=1)
    """The last fraction of the corpus that is the validation split."""
    samples_per_epoch: int = setting(20_000, ge=1)
    """Training windows per epoch, one at a random place in each of this many equal slices of the split."""
    val_samples: int = setting(1_000, ge=1)
    """At most this many fixed, non-overlapping validation windows, spread evenly over the split."""

    @model_validator(mode="after")
    def _heads(self) -> GPTOptions:
        if self.n_embd % self.n_head:
            raise problem(f"must be a multiple of n_head ({self.n_head}); got {self.n_embd}", ".n_embd")
        return self


_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "__pycache__"}


def stdlib_corpus(max_bytes: int, root: str | None = None) -> bytes:
    """The standard library's `*.py` files in sorted path order, concatenated, cut at `max_bytes`."""
    root_path = Path(root or sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root_path):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]
        files.extend(Path(dirpath, f) for f in filenames if f.endswith(".py"))
    files.sort(key=lambda p: p.relative_to(root_path).as_posix())
    chunks, size = [], 0
    for path in files:
        if size >= max_bytes:
            break
        try:
            chunk = path.read_bytes()
        except OSError:
            continue
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)[:max_bytes]


def read_corpus(text_file: str, max_bytes: int) -> bytes:
    if not text_file:
        return stdlib_corpus(max_bytes)
    path = Path(text_file).expanduser()
    if not path.is_file():
        raise UsageError(f"task.options.text_file: file not found: {text_file!r}; give the path of a text file "
                         "or leave it empty to train on the Python standard library's source")
    with open(path, "rb") as f:
        return f.read(max_bytes)


class ByteWindows(Dataset):
    """Windows of `block_size + 1` bytes; an item is (inputs, targets), the targets shifted by one.

    Window i starts at `starts[i]`, plus, if `jitter` > 0, a random shift in [0, jitter] that depends
    only on (seed, epoch, i) (`sample_random`, set by the trainer's sampler; clipped to the end of the data). Indexed a whole batch
    at a time (`__getitems__`); use `collate_fn=ByteWindows.collate`.
    """

    def __init__(self, data: torch.Tensor, starts: torch.Tensor, block_size: int, jitter: int = 0):
        assert data.dtype == torch.uint8 and data.ndim == 1
        self.max_start = len(data) - block_size - 1
        assert self.max_start >= 0 and (len(starts) == 0 or int(starts.max()) <= self.max_start)
        self.data = data
        self.starts = starts
        self.jitter = jitter
        self.sample_random = SampleRandom() if jitter else None
        self.span = torch.arange(block_size + 1)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, index: int):
        x, y = self.__getitems__([index])
        return x[0], y[0]

    def __getitems__(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(indices, dtype=torch.long)
        starts = self.starts[index]
        if self.jitter:
            shift = self.sample_random.integers(index, 0, self.jitter + 1)[:, 0]
            starts = (starts + shift).clamp_(max=self.max_start)
        windows = self.data[starts[:, None] + self.span].long()
        return windows[:, :-1], windows[:, 1:]

    @staticmethod
    def collate(batch):
        return batch


def split_corpus(corpus: bytes, val_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Train = the first (1 - val_fraction) of the bytes, validation = the rest."""
    data = torch.frombuffer(bytearray(corpus), dtype=torch.uint8)
    num_val = int(len(data) * val_fraction)
    return data[: len(data) - num_val], data[len(data) - num_val:]


def train_slices(num_bytes: int, block_size: int, num_samples: int) -> tuple[torch.Tensor, int]:
    """Starts of `num_samples` equal slices of the possible window starts, and the slice length - 1 (the jitter)."""
    num_starts = num_bytes - block_size  # window starts 0 .. num_bytes - block_size - 1
    starts = torch.arange(num_samples, dtype=torch.float64).mul_(num_starts / num_samples).long()
    return starts, max(0, num_starts // num_samples - 1)


def val_starts(num_bytes: int, block_size: int, max_samples: int) -> torch.Tensor:
    """Starts of non-overlapping windows, evenly spread over the split if there are more than `max_samples`."""
    window = block_size + 1
    available = num_bytes // window
    count = min(available, max_samples)
    picks = torch.linspace(0, available - 1, count).round().long() if count < available else torch.arange(count)
    return picks * window


def _loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def _metrics(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    logits = logits.float()
    token_loss = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    return {"loss": token_loss.mean(1), "accuracy": (logits.argmax(-1) == targets).float().mean(1)}


def _finalize(metrics: dict[str, float]) -> dict[str, float]:
    out = dict(metrics)
    if "loss" in metrics:
        out["perplexity"] = math.exp(min(metrics["loss"], 50.0))
        out["bits_per_byte"] = metrics["loss"] / math.log(2)
    return out


def build(task: TaskConfig, data: DataConfig) -> Task:
    opts = parse_options(GPTOptions, task)
    if task.model not in ("", "gpt"):
        raise UsageError(f"task.model: gpt has no model {task.model!r}; use gpt (sized by task.options.n_layer, ...)")
    block_size = opts.block_size
    corpus = read_corpus(opts.text_file, opts.max_bytes)
    train_bytes, val_bytes = split_corpus(corpus, opts.val_fraction)
    source = opts.text_file or "the Python standard library source"
    if len(val_bytes) < block_size + 1 or len(train_bytes) < block_size + 1:
        raise UsageError(
            f"task.options.block_size: {source} ({len(corpus)} bytes) is too short for windows of {block_size + 1} "
            f"bytes in both splits (validation = last {opts.val_fraction:g}); use a longer text or a smaller block_size")
    model = GPT(GPTConfig(block_size=block_size, n_layer=opts.n_layer, n_head=opts.n_head,
                          n_embd=opts.n_embd, dropout=opts.dropout))
    starts, jitter = train_slices(len(train_bytes), block_size, opts.samples_per_epoch)
    train_set = ByteWindows(train_bytes, starts, block_size, jitter)
    val_set = ByteWindows(val_bytes, val_starts(len(val_bytes), block_size, opts.val_samples), block_size)
    return Task(
        model=model,
        train_set=train_set,
        val_set=val_set,
        loss=_loss,
        metrics=_metrics,
        collate_fn=ByteWindows.collate,
        finalize=_finalize,
        tokens_per_sample=block_size,
        flops_per_token=model.flops_per_token(block_size),
        description=(f"byte-level GPT {opts.n_layer}x{opts.n_embd} ({model.num_params() / 1e6:.2f}M params), "
                     f"block {block_size}, on {source}: {len(train_bytes)} train / {len(val_bytes)} val bytes, "
                     f"{len(train_set)} random train windows per epoch, {len(val_set)} val windows"),
    )
