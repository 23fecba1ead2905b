"""Data plumbing shared by all tasks: the training sampler and fast in-memory datasets.

`EpochSampler` owns the order of training samples. Each epoch is a fresh permutation from
(seed, epoch), truncated to a whole number of *global* optimizer steps, so that

- every process gets the same number of micro-batches, a multiple of grad_accum_steps;
- 1 process x batch 32, 2 processes x batch 16 and 1 process x batch 16 x 2 accumulation see the
  same 32 samples in every optimizer step (Accelerate deals whole batches round-robin to ranks);
- a resumed run can start mid-epoch at an exact sample offset (`start`) without replaying batches
  (Accelerate's `skip_first_batches` is avoided: accelerate#2016, #3242).

`SampleRandom` makes every random choice of data (a crop, a flip, a window's offset, noise) a pure
function of (seed, epoch, sample index, draw number), never of torch's global RNG or of how many
samples were loaded before: a resumed run, or a run on another number of processes with the same
global batch, sees exactly the same batches. A dataset opts in with a `sample_random` attribute;
the sampler sets its seed and epoch.

`InMemoryLoader` yields one process's training batches straight from a dataset with `__getitems__`
(CPU, no worker processes), the same batches a prepared DataLoader would, without its per-batch cost.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 arrays (wrapping arithmetic): a bijection that scrambles every bit."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class SampleRandom:
    """Random numbers of a training sample that depend only on (seed, epoch, sample index, draw number).

    Give a dataset one as its `sample_random` attribute and draw from it in `__getitem__` /
    `__getitems__` with the indices being loaded; the trainer's sampler sets `seed` (train.seed)
    and `epoch` (0-based) before every epoch. Nothing depends on torch's global RNG, the batch a
    sample lands in, the process that loads it or the loader's read-ahead, so resuming mid-epoch
    and resuming on another number of processes see the same data. Counter-based (a splitmix64
    hash of the key), vectorised: about a microsecond per batch of draws.

        self.sample_random = SampleRandom()                      # in the dataset's __init__
        u = self.sample_random.uniform(indices, 2)               # [len(indices), 2] in [0, 1), float64
        k = self.sample_random.integers(indices, 0, 9, 2)        # [len(indices), 2] in [0, 9)
        g = self.sample_random.generator(index)                  # a torch.Generator for one sample
    """

    def __init__(self, seed: int = 0, epoch: int = 0, stream: int = 0):
        self.seed = seed
        self.epoch = epoch
        self.stream = stream
        """Tell apart independent uses in one dataset (e.g. 0 for crops, 1 for noise)."""

    def set_epoch(self, seed: int, epoch: int) -> None:
        self.seed, self.epoch = seed, epoch

    def _keys(self, indices) -> np.ndarray:
        # A CPU index tensor is read as an array view (no per-item conversion); indices never live on a device.
        idx = (indices.cpu().numpy() if isinstance(indices, torch.Tensor) else np.asarray(indices)).astype(np.int64)
        base = _MASK64 & (self.seed * _GOLDEN + 0x632BE59BD9B4E019)
        h = _mix64(np.array([base], dtype=np.uint64))
        h = _mix64(h ^ np.uint64(_MASK64 & (self.epoch * 0xD1B54A32D192ED03 + 1)))
        h = _mix64(h ^ np.uint64(_MASK64 & (self.stream * 0x8CB92BA72F3D8DD7 + 2)))
        return _mix64(h ^ idx.astype(np.uint64).reshape(-1))

    def bits(self, indices, n: int = 1) -> np.ndarray:
        """[len(indices), n] uniformly random uint64 values."""
        keys = self._keys(indices)
        draws = (np.arange(1, n + 1, dtype=np.uint64) * np.uint64(_GOLDEN))[None, :]
        return _mix64(keys[:, None] + draws)

    def uniform(self, indices, n: int = 1) -> torch.Tensor:
        """[len(indices), n] float64 uniform in [0, 1) (53 random bits each)."""
        return torch.from_numpy((self.bits(indices, n) >> np.uint64(11)).astype(np.float64) * 2.0 ** -53)

    def integers(self, indices, low: int, high: int, n: int = 1) -> torch.Tensor:
        """[len(indices), n] int64 uniform in [low, high)."""
        span = high - low
        if span < 1:
            raise ValueError(f"integers: empty range [{low}, {high})")
        return torch.from_numpy((self.bits(indices, n) % np.uint64(span)).astype(np.int64) + low)

    def generator(self, index: int) -> torch.Generator:
        """A torch.Generator seeded from this sample's key, for any torch random op on one sample."""
        g = torch.Generator()
        g.manual_seed(int(self.bits([index], 1)[0, 0] >> np.uint64(1)))
        return g


def sample_random_of(dataset) -> SampleRandom | None:
    """The dataset's `sample_random`, if it opted in."""
    rng = getattr(dataset, "sample_random", None)
    return rng if isinstance(rng, SampleRandom) else None


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
        self.followers: list[SampleRandom] = []

    def follow(self, dataset) -> None:
        """Keep the dataset's `sample_random` (if any) on this sampler's seed and epoch."""
        rng = sample_random_of(dataset)
        if rng is not None and rng not in self.followers:
            rng.set_epoch(self.seed, self.epoch)
            self.followers.append(rng)

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
        for rng in self.followers:
            rng.set_epoch(self.seed, epoch)

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

    `transform(batch)` runs on each batch; a transform with a `sample_random` attribute (random
    augmentation as a function of position) is called as `transform(batch, indices)` and becomes the
    dataset's `sample_random`. Use with `collate_fn=TensorBatchDataset.collate`.
    """

    def __init__(self, *tensors: torch.Tensor, transform=None):
        assert all(len(t) == len(tensors[0]) for t in tensors)
        self.tensors = tensors
        self.transform = transform
        self.sample_random = sample_random_of(transform)

    def __len__(self) -> int:
        return len(self.tensors[0])

    def __getitem__(self, index: int):
        return self.__getitems__([index + len(self) if index < 0 else index])

    def __getitems__(self, indices: Sequence[int] | torch.Tensor):
        # from_numpy + index_select: half the time of as_tensor(list) + t[idx] (~10 us a batch), same values
        idx = indices if isinstance(indices, torch.Tensor) else torch.from_numpy(np.asarray(indices, dtype=np.int64))
        batch = tuple(t.index_select(0, idx.to(t.device)) for t in self.tensors)
        if self.transform is None:
            return batch
        return self.transform(batch, idx) if self.sample_random is not None else self.transform(batch)

    @staticmethod
    def collate(batch):
        return batch


class InMemoryLoader:
    """One process's training batches, read straight from a dataset with `__getitems__`.

    Yields what `accelerator.prepare(DataLoader(dataset, batch_size, sampler=sampler, drop_last=True,
    collate_fn=collate_fn))` yields on CPU with no worker processes, without its ~45 us per batch (3%
    of a MNIST-1D CNN step; bench/overhead.py): process r of n takes batches r, r + n, r + 2n, ... of
    the sampler's order (Accelerate's round-robin), from the sampler's current epoch and start. Both
    of the DataLoader pair's uses of torch's global RNG are kept, so a task that still draws from it
    while loading (instead of `SampleRandom`) gets the same numbers as with the DataLoader: one draw
    per epoch (the iterator's base seed) and each batch read one ahead of the one yielded
    (Accelerate's look-ahead).
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

    sampler.follow(task.train_set)
    # Worker processes copy the dataset when an epoch's iteration starts; persistent ones would keep
    # the first epoch's `sample_random`.
    keyed = sample_random_of(task.train_set) is not None
    common = dict(num_workers=data_cfg.num_workers, pin_memory=data_cfg.pin_memory and torch.cuda.is_available(),
                  collate_fn=task.collate_fn, persistent_workers=data_cfg.num_workers > 0)
    if in_memory_ok(accelerator, task.train_set, data_cfg.num_workers):
        train = InMemoryLoader(task.train_set, sampler, train_cfg.batch_size, accelerator.process_index,
                               accelerator.num_processes, task.collate_fn)
    else:
        train = DataLoader(task.train_set, batch_size=train_cfg.batch_size, sampler=sampler, drop_last=True,
                           **{**common, "persistent_workers": common["persistent_workers"] and not keyed})
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
