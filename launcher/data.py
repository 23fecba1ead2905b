"""Data plumbing shared by all tasks: the training sampler and fast in-memory datasets.

`EpochSampler` owns the order of training samples. Each epoch is a fresh permutation from
(seed, epoch), truncated to a whole number of *global* optimizer steps, so that

- every process gets the same number of micro-batches, a multiple of grad_accum_steps;
- 1 process x batch 32, 2 processes x batch 16 and 1 process x batch 16 x 2 accumulation see the
  same 32 samples in every optimizer step (Accelerate deals whole batches round-robin to ranks);
- a resumed run can start mid-epoch at an exact sample offset (`start`) without replaying batches
  (Accelerate's `skip_first_batches` is avoided: accelerate#2016, #3242).

`InMemoryLoader` yields one process's training batches straight from a dataset with `__getitems__`
(CPU, no worker processes), the same batches a prepared DataLoader would, without its per-batch cost.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler


class EpochSampler(Sampler[int]):
    def __init__(self, num_samples: int, samples_per_step: int, seed: int, shuffle: bool = True):
        if samples_per_step > num_samples:
            raise ValueError(
                f"one optimizer step needs {samples_per_step} samples but the training set has {num_samples}: "
                "lower train.batch_size or train.grad_accum_steps")
        self.num_samples = num_samples
        self.samples_per_step = samples_per_step
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.start = 0

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.samples_per_step

    def set_epoch(self, epoch: int, start_step: int | None = None) -> None:
        """Select the permutation of `epoch` (0-based) and skip its first `start_step` optimizer steps.

        Without `start_step`, the same epoch keeps its start: Accelerate's prepared DataLoader calls
        `set_epoch(its iteration count)` at every `iter()`, which must not undo a resume position (the
        trainer also calls the loader's `set_epoch(epoch)` so that count is the epoch).
        """
        if start_step is None:
            start_step = self.start // self.samples_per_step if epoch == self.epoch else 0
        self.epoch = epoch
        self.start = start_step * self.samples_per_step

    def order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.num_samples)
        g = torch.Generator()
        g.manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_samples, generator=g)

    def __iter__(self) -> Iterator[int]:
        used = self.steps_per_epoch * self.samples_per_step
        yield from self.order(self.epoch)[self.start:used].tolist()

    def __len__(self) -> int:
        return self.steps_per_epoch * self.samples_per_step - self.start


class TensorBatchDataset(Dataset):
    """Tensors indexed a whole batch at a time (`__getitems__`): no per-sample Python work.

    Use with `collate_fn=TensorBatchDataset.collate`.
    """

    def __init__(self, *tensors: torch.Tensor, transform=None):
        assert all(len(t) == len(tensors[0]) for t in tensors)
        self.tensors = tensors
        self.transform = transform

    def __len__(self) -> int:
        return len(self.tensors[0])

    def __getitem__(self, index: int):
        return self.__getitems__([index + len(self) if index < 0 else index])

    def __getitems__(self, indices: Sequence[int] | torch.Tensor):
        # from_numpy + index_select: half the time of as_tensor(list) + t[idx] (~10 us a batch), same values
        idx = indices if isinstance(indices, torch.Tensor) else torch.from_numpy(np.asarray(indices, dtype=np.int64))
        batch = tuple(t.index_select(0, idx.to(t.device)) for t in self.tensors)
        return self.transform(batch) if self.transform is not None else batch

    @staticmethod
    def collate(batch):
        return batch


class InMemoryLoader:
    """One process's training batches, read straight from a dataset with `__getitems__`.

    Yields what `accelerator.prepare(DataLoader(dataset, batch_size, sampler=sampler, drop_last=True,
    collate_fn=collate_fn))` yields on CPU with no worker processes, without its ~45 us per batch (3%
    of a MNIST-1D CNN step; bench/overhead.py): process r of n takes batches r, r + n, r + 2n, ... of
    the sampler's order (Accelerate's round-robin), from the sampler's current epoch and start. Both
    of the DataLoader pair's uses of torch's global RNG are kept, so a task that draws from it while
    loading (gpt's random windows) gets the same numbers: one draw per epoch (the iterator's base
    seed) and each batch read one ahead of the one yielded (Accelerate's look-ahead).
    """

    def __init__(self, dataset: Dataset, sampler: EpochSampler, batch_size: int, process_index: int = 0,
                 num_processes: int = 1, collate_fn: Callable | None = None):
        from torch.utils.data import default_collate

        assert sampler.samples_per_step % (batch_size * num_processes) == 0
        self.dataset = dataset
        self.sampler = sampler
        self.batch_size = batch_size
        self.process_index = process_index
        self.num_processes = num_processes
        self.collate_fn = collate_fn or default_collate

    def _firsts(self) -> range:
        s = self.sampler
        stride = self.batch_size * self.num_processes
        return range(s.start + self.process_index * self.batch_size, s.steps_per_epoch * s.samples_per_step, stride)

    def __len__(self) -> int:
        return len(self._firsts())

    def __iter__(self):
        torch.empty((), dtype=torch.int64).random_()  # DataLoader's iterator draws its base seed here
        order = self.sampler.order(self.sampler.epoch)
        if type(self.dataset).__getitems__ is not TensorBatchDataset.__getitems__:
            order = order.tolist()  # other datasets get the list of ints a DataLoader passes; ours takes the tensor
        batches = (self.collate_fn(self.dataset.__getitems__(order[i:i + self.batch_size])) for i in self._firsts())
        current = next(batches, _END)
        while current is not _END:
            following = next(batches, _END)  # read one ahead before yielding, as Accelerate's loader does
            yield current
            current = following


_END = object()


def in_memory_ok(accelerator, dataset, num_workers: int) -> bool:
    """Can `InMemoryLoader` stand in for the prepared training DataLoader (CPU, DDP or one process)?"""
    from accelerate.utils import DistributedType

    return (num_workers == 0 and callable(getattr(dataset, "__getitems__", None))
            and accelerator.device.type == "cpu"
            and accelerator.distributed_type in (DistributedType.NO, DistributedType.MULTI_CPU,
                                                 DistributedType.MULTI_GPU))


def build_loaders(task, train_cfg, data_cfg, sampler: EpochSampler, accelerator):
    """(train, val) loaders of a task, as the trainer and the LR finder use them.

    The training loader is an `InMemoryLoader` where that yields the same batches as Accelerate's
    prepared DataLoader (small in-memory data on CPU), else a DataLoader for `accelerator.prepare`.
    """
    from torch.utils.data import DataLoader

    common = dict(num_workers=data_cfg.num_workers, pin_memory=data_cfg.pin_memory and torch.cuda.is_available(),
                  collate_fn=task.collate_fn, persistent_workers=data_cfg.num_workers > 0)
    if in_memory_ok(accelerator, task.train_set, data_cfg.num_workers):
        train = InMemoryLoader(task.train_set, sampler, train_cfg.batch_size, accelerator.process_index,
                               accelerator.num_processes, task.collate_fn)
    else:
        train = DataLoader(task.train_set, batch_size=train_cfg.batch_size, sampler=sampler, drop_last=True,
                           **common)
    val = EvalLoader(task.val_set, data_cfg.val_batch_size or 4 * train_cfg.batch_size, accelerator, **common)
    return train, val


class EvalLoader:
    """This process's share of the validation set, as `(batch, num_valid)` on the device.

    Process r of n takes samples r, r + n, r + 2n, ... and pads its share to ceil(N / n) samples by
    wrapping around, so every process runs the same number of forward passes (FSDP and ZeRO-3 gather
    parameters in each). The real samples come first: `num_valid` says how many of a batch count,
    so per-rank sums of per-sample metrics over them, added across ranks in one all-reduce, are the
    exact sums over the validation set (no gather per batch, nothing counted twice).
    """

    def __init__(self, dataset: Dataset, batch_size: int, accelerator, **loader_kwargs):
        from torch.utils.data import DataLoader

        n, world, rank = len(dataset), accelerator.num_processes, accelerator.process_index
        share = -(-n // world)
        self.num_samples = n
        self.valid = len(range(rank, n, world))
        self.batch_size = batch_size
        self.device = accelerator.device
        indices = [(rank + world * j) % n for j in range(share)] if n else []
        self.loader = DataLoader(dataset, batch_size=batch_size, sampler=indices, shuffle=False, **loader_kwargs)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        from accelerate.utils import send_to_device

        for b, batch in enumerate(self.loader):
            yield send_to_device(batch, self.device, non_blocking=True), max(0, self.valid - b * self.batch_size)


def cast_floats(value, dtype: torch.dtype):
    """Floating-point inputs in `dtype` (DeepSpeed runs the model in fp16/bf16 without autocast)."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, dict):
        return {k: cast_floats(v, dtype) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(cast_floats(v, dtype) for v in value)
    return value
