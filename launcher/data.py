"""Data plumbing shared by all tasks: the training sampler and fast in-memory datasets.

`EpochSampler` owns the order of training samples. Each epoch is a fresh permutation from
(seed, epoch), truncated to a whole number of *global* optimizer steps, so that

- every process gets the same number of micro-batches, a multiple of grad_accum_steps;
- 1 process x batch 32, 2 processes x batch 16 and 1 process x batch 16 x 2 accumulation see the
  same 32 samples in every optimizer step (Accelerate deals whole batches round-robin to ranks);
- a resumed run can start mid-epoch at an exact sample offset (`start`) without replaying batches
  (Accelerate's `skip_first_batches` is avoided: accelerate#2016, #3242).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

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
        return self.__getitems__([index])

    def __getitems__(self, indices: Sequence[int]):
        idx = torch.as_tensor(indices, dtype=torch.long)
        batch = tuple(t[idx] for t in self.tensors)
        return self.transform(batch) if self.transform is not None else batch

    @staticmethod
    def collate(batch):
        return batch
