"""CIFAR-10 (Krizhevsky 2009): 50,000 training and 10,000 test colour images of 32x32 pixels, 10 classes.

The data is the official python archive `cifar-10-python.tar.gz` (a `cifar-10-batches-py/` folder of
pickled dicts, `data_batch_1..5` and `test_batch`, each with b'data' uint8 [N, 3072] and b'labels').
It is looked for, in this order, as `cifar-10-batches-py/` or the tarball in `data_root()` and in
`data_root()/cifar10/`; if neither is there the tarball is downloaded into `data_root()/cifar10/`
and its MD5 checked. The first load converts it to uint8 arrays cached in
`data_root()/cifar10/cifar10_uint8.npz`, which later runs load in a fraction of a second.

Batches are built whole (`__getitems__`): training images get a random 32x32 crop from the image
zero-padded by 4 pixels and a random horizontal flip, both a pure function of (train.seed, epoch,
image index) (`launcher.data.SampleRandom`, never torch's global RNG, so a resumed run sees the same
crops), then every image is normalised with the per-channel CIFAR-10 mean and std. Evaluation images are
only normalised.

Options (`task.options`, `CIFAR10Options`): `augment` (default true), `subset` / `val_subset` (use only
the first N training / test images; 0 = all). Models (`task.model`): `resnet18` (default, the CIFAR ResNet-18),
`resnet_tiny` (the same shape with 8-64 channels, for tests and CPU runs).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from launcher.config import DataConfig, TaskConfig
from launcher.data import SampleRandom, TensorBatchDataset
from launcher.errors import UsageError
from launcher.models.resnet import resnet18, resnet_tiny
from launcher.tasks import Task, data_root, parse_options, setting, task_options
from launcher.tasks.common import classification_loss, classification_metrics, load_arrays_npz, save_arrays

URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
MD5 = "c58f30108f718f92721af3b95e74349a"
ARCHIVE = "cifar-10-python.tar.gz"
FOLDER = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
CACHE = "cifar10_uint8.npz"

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
PAD = 4

MODELS = {"resnet18": resnet18, "resnet_tiny": resnet_tiny}


@task_options
class CIFAR10Options:
    augment: bool = True
    """Random 32x32 crops (of the image padded by 4 pixels) and horizontal flips of the training images."""
    subset: int = setting(0, ge=0, le=50_000, note="0 = all images")
    """Train on the first N of the 50,000 training images; 0 = all."""
    val_subset: int = setting(0, ge=0, le=10_000, note="0 = all images")
    """Evaluate on the first N of the 10,000 test images; 0 = all."""


# ---------------------------------------------------------------------------------------------
# Getting the data
# ---------------------------------------------------------------------------------------------


def md5sum(path: str, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def verify_md5(path: str, expected: str) -> None:
    """Raise UsageError if the file's MD5 is not `expected`."""
    actual = md5sum(path)
    if actual != expected:
        raise UsageError(f"checksum mismatch for {path}: md5 {actual}, expected {expected}; "
                         "the download is corrupt or incomplete: delete it and run again")


def download(url: str, dest: str, md5: str) -> None:
    """Fetch `url` to `dest`, verified against `md5`, atomically: `dest` appears only when complete and correct."""
    folder = os.path.dirname(os.path.abspath(dest))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(dest) + ".", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=60) as response:
                    _copy_with_progress(response, out, os.path.basename(dest))
            except (urllib.error.URLError, OSError) as err:
                raise UsageError(f"download failed ({url}: {err}); place {os.path.basename(dest)} in {folder} "
                                 "or set data.root to a folder that holds it") from None
        verify_md5(tmp, md5)
        os.replace(tmp, dest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def _copy_with_progress(response, out, name: str, chunk_size: int = 1 << 20) -> None:
    total = int(response.headers.get("Content-Length") or 0)
    done, last = 0, 0.0
    while chunk := response.read(chunk_size):
        out.write(chunk)
        done += len(chunk)
        now = time.monotonic()
        if now - last > 1.0 or (total and done == total):
            last = now
            of_total = f" / {total / 1e6:.1f} MB ({100 * done / total:.0f}%)" if total else " MB"
            print(f"\rdownloading {name}: {done / 1e6:.1f}{of_total}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr, flush=True)


@contextlib.contextmanager
def _file_lock(path: str) -> Iterator[None]:
    """Serialise download and conversion between processes (ranks) on one machine or shared filesystem."""
    try:
        import fcntl
    except ImportError:  # not POSIX: writes are still atomic, ranks may just repeat the work
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _read_batches(source: str) -> dict[str, dict]:
    """The pickled batch dicts from an extracted folder or straight from the tarball (nothing extracted)."""
    names = (*TRAIN_BATCHES, TEST_BATCH)
    batches = {}
    # The batches are pickles, as the dataset is distributed; only read archives from a trusted source
    # (the official one: a downloaded archive has had its MD5 checked).
    if os.path.isdir(source):
        for name in names:
            path = os.path.join(source, name)
            if not os.path.isfile(path):
                raise UsageError(f"data.root: {source} lacks {name}; it must hold the extracted {ARCHIVE} "
                                 f"({', '.join(names)})")
            with open(path, "rb") as f:
                batches[name] = pickle.load(f, encoding="bytes")
        return batches
    try:
        with tarfile.open(source, "r:gz") as tar:
            for name in names:
                try:
                    member = tar.extractfile(f"{FOLDER}/{name}")
                except KeyError:
                    member = None
                if member is None:
                    raise UsageError(f"data.root: {source} lacks {FOLDER}/{name}; use the official {ARCHIVE}")
                batches[name] = pickle.load(member, encoding="bytes")
    except (tarfile.TarError, EOFError, OSError) as err:
        raise UsageError(f"data.root: cannot read {source} ({err}); delete it and run again, or replace it with "
                         f"the official {ARCHIVE}") from None
    return batches


def _to_arrays(batches: dict[str, dict]) -> dict[str, np.ndarray]:
    def stack(names):
        x = np.concatenate([np.asarray(batches[n][b"data"], dtype=np.uint8) for n in names])
        y = np.concatenate([np.asarray(batches[n][b"labels"], dtype=np.int64) for n in names])
        return x.reshape(-1, 3, 32, 32), y

    x, y = stack(TRAIN_BATCHES)
    x_test, y_test = stack((TEST_BATCH,))
    return {"x": x, "y": y, "x_test": x_test, "y_test": y_test}


def find_source(root: str) -> str | None:
    for folder in (root, os.path.join(root, "cifar10")):
        for name in (FOLDER, ARCHIVE):
            path = os.path.join(folder, name)
            if os.path.exists(path):
                return path
    return None


def load_arrays(root: str, url: str = URL) -> dict[str, np.ndarray]:
    """CIFAR-10 as uint8 images x [N, 3, 32, 32] and int64 labels y (and x_test, y_test)."""
    cache_dir = os.path.join(root, "cifar10")
    cache = os.path.join(cache_dir, CACHE)
    if os.path.exists(cache):
        return load_arrays_npz(cache)
    try:
        os.makedirs(cache_dir, exist_ok=True)
        writable = os.access(cache_dir, os.W_OK)
    except OSError:
        writable = False
    if not writable:
        source = find_source(root)
        if source is None:
            raise UsageError(f"data.root: {root} holds no CIFAR-10 ({FOLDER}/ or {ARCHIVE}) and {cache_dir} is "
                             "not writable for a download; set data.root to a writable folder")
        return _to_arrays(_read_batches(source))  # a read-only copy of the data: convert every time
    with _file_lock(os.path.join(cache_dir, ".lock")):
        if os.path.exists(cache):  # another process made it while we waited
            return load_arrays_npz(cache)
        source = find_source(root)
        if source is None:
            source = os.path.join(cache_dir, ARCHIVE)
            download(url, source, MD5)
        arrays = _to_arrays(_read_batches(source))
        save_arrays(cache, arrays)
        return arrays


# ---------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------


class Normalize:
    """uint8 images [B, 3, H, W] -> float32, per-channel standardised."""

    def __init__(self, mean=MEAN, std=STD):
        self.scale = (1.0 / (255.0 * torch.tensor(std))).view(1, 3, 1, 1)
        self.shift = (torch.tensor(mean) / torch.tensor(std)).view(1, 3, 1, 1)

    def __call__(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = batch
        return x.float() * self.scale - self.shift, y


class CropFlipNormalize(Normalize):
    """Random 32x32 crop of the zero-padded image plus a random horizontal flip, per image, in one gather.

    Called with the images' indices: the crop and flip of an image depend only on (seed, epoch, index).
    """

    def __init__(self, pad: int = PAD, mean=MEAN, std=STD):
        super().__init__(mean, std)
        self.pad = pad
        self.sample_random = SampleRandom()

    def __call__(self, batch: tuple[torch.Tensor, torch.Tensor], indices) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = batch
        n, _, h, w = x.shape
        padded = F.pad(x, (self.pad,) * 4)
        offsets = self.sample_random.integers(indices, 0, 2 * self.pad + 1, 3)  # the third draw: the flip
        top = offsets[:, 0].view(n, 1, 1)
        left = offsets[:, 1].view(n, 1)
        flip = (offsets[:, 2] % 2 == 1).view(n, 1)
        cols = torch.arange(w).expand(n, w)
        cols = torch.where(flip, w - 1 - cols, cols) + left
        rows = torch.arange(h).view(1, h, 1) + top
        crops = padded[torch.arange(n).view(n, 1, 1), :, rows, cols.view(n, 1, w)]  # [n, h, w, c]
        return super().__call__((crops.permute(0, 3, 1, 2).contiguous(), y))


# ---------------------------------------------------------------------------------------------
# The task
# ---------------------------------------------------------------------------------------------


def build(task: TaskConfig, data: DataConfig) -> Task:
    opts = parse_options(CIFAR10Options, task)
    model_name = task.model or "resnet18"
    if model_name not in MODELS:
        raise UsageError(f"task.model: cifar10 has no model {model_name!r}; use one of {', '.join(MODELS)}")
    arrays = load_arrays(data_root(data))
    num_train = opts.subset or len(arrays["x"])
    num_val = opts.val_subset or len(arrays["x_test"])
    x = torch.from_numpy(arrays["x"][:num_train])
    y = torch.from_numpy(arrays["y"][:num_train])
    x_test = torch.from_numpy(arrays["x_test"][:num_val])
    y_test = torch.from_numpy(arrays["y_test"][:num_val])
    train_transform = CropFlipNormalize() if opts.augment else Normalize()
    return Task(
        model=MODELS[model_name](),
        train_set=TensorBatchDataset(x, y, transform=train_transform),
        val_set=TensorBatchDataset(x_test, y_test, transform=Normalize()),
        loss=classification_loss,
        metrics=classification_metrics,
        collate_fn=TensorBatchDataset.collate,
        description=f"CIFAR-10 {model_name} ({len(x)} train / {len(x_test)} test"
                    + (", crop+flip augmentation)" if opts.augment else ", no augmentation)"),
    )
