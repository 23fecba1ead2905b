"""The cifar10 task on a small archive in the official format (no download, no network)."""

from __future__ import annotations

import io
import os
import pickle
import tarfile

import numpy as np
import pytest
import torch

from launcher.config import DataConfig, TaskConfig
from launcher.errors import UsageError
from launcher.tasks import build_task
from launcher.tasks import cifar10 as c10

from helpers import fit_batch

NUM_PER_BATCH = 8  # 5 training batches -> 40 training images; 8 test images


def _batches(seed: int = 0) -> dict[str, dict]:
    rng = np.random.default_rng(seed)
    out = {}
    for name in (*c10.TRAIN_BATCHES, c10.TEST_BATCH):
        out[name] = {
            b"batch_label": name.encode(),
            b"labels": [int(v) for v in rng.integers(0, 10, NUM_PER_BATCH)],
            b"data": rng.integers(0, 256, (NUM_PER_BATCH, 3072), dtype=np.uint8),
            b"filenames": [f"img_{i}.png".encode() for i in range(NUM_PER_BATCH)],
        }
    return out


def _write_archive(path, batches: dict[str, dict]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, content in batches.items():
            raw = pickle.dumps(content, protocol=2)
            info = tarfile.TarInfo(f"{c10.FOLDER}/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))


@pytest.fixture
def archive_root(tmp_path):
    batches = _batches()
    _write_archive(tmp_path / c10.ARCHIVE, batches)
    return tmp_path, batches


def _task(root, **options):
    model = options.pop("model", "resnet_tiny")
    return build_task(TaskConfig(name="cifar10", model=model, options=options), DataConfig(root=str(root)))


def test_loads_archive_shapes_dtypes_labels(archive_root):
    root, batches = archive_root
    arrays = c10.load_arrays(str(root))
    assert arrays["x"].shape == (5 * NUM_PER_BATCH, 3, 32, 32) and arrays["x"].dtype == np.uint8
    assert arrays["x_test"].shape == (NUM_PER_BATCH, 3, 32, 32)
    expected_labels = [label for n in c10.TRAIN_BATCHES for label in batches[n][b"labels"]]
    assert arrays["y"].tolist() == expected_labels
    assert arrays["y_test"].tolist() == batches[c10.TEST_BATCH][b"labels"]
    # Row layout: 1024 red, then 1024 green, then 1024 blue values, each row-major 32x32.
    first = batches["data_batch_1"][b"data"][0]
    assert np.array_equal(arrays["x"][0, 1, 2, 3], first[1024 + 2 * 32 + 3])
    assert os.path.exists(root / "cifar10" / c10.CACHE)


def test_cache_is_reused_and_extracted_folder_works(tmp_path):
    batches = _batches(seed=1)
    folder = tmp_path / c10.FOLDER
    folder.mkdir()
    for name, content in batches.items():
        (folder / name).write_bytes(pickle.dumps(content, protocol=2))
    first = c10.load_arrays(str(tmp_path))
    for name in batches:
        (folder / name).unlink()
    second = c10.load_arrays(str(tmp_path))  # from the .npz cache only
    for key in first:
        assert np.array_equal(first[key], second[key])


def test_task_batches_are_normalised_float(archive_root):
    root, _ = archive_root
    task = _task(root, augment=False)
    x, y = task.collate_fn(task.train_set.__getitems__(list(range(40))))
    assert x.shape == (40, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    # Uniform random bytes normalised with CIFAR's statistics: channel means near (127.5/255 - mean) / std.
    expected = (0.5 - torch.tensor(c10.MEAN)) / torch.tensor(c10.STD)
    assert torch.allclose(x.mean(dim=(0, 2, 3)), expected, atol=0.05)
    raw = torch.from_numpy(c10.load_arrays(str(root))["x"][:40])
    assert torch.allclose(x, (raw.float() / 255 - torch.tensor(c10.MEAN).view(1, 3, 1, 1))
                          / torch.tensor(c10.STD).view(1, 3, 1, 1), atol=1e-5)


def test_subset_options(archive_root):
    root, _ = archive_root
    task = _task(root, subset=16, val_subset=4)
    assert len(task.train_set) == 16 and len(task.val_set) == 4


def test_augmentation_crops_and_flips():
    torch.manual_seed(0)
    n = 256
    x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8)
    y = torch.arange(n)
    augment = c10.CropFlipNormalize()
    normalize = c10.Normalize()
    out, out_y = augment((x, y), torch.arange(n))
    assert out.shape == (n, 3, 32, 32) and out.dtype == torch.float32 and torch.equal(out_y, y)

    # Recover each image's (dy, dx, flip) by matching against every candidate crop of the padded image.
    padded = normalize((torch.nn.functional.pad(x, (4, 4, 4, 4)), y))[0]  # zero (black) padding, as torchvision
    seen = set()
    for i in range(n):
        found = None
        for dy in range(9):
            for dx in range(9):
                crop = padded[i, :, dy:dy + 32, dx:dx + 32]
                for flip in (False, True):
                    if torch.allclose(out[i], crop.flip(-1) if flip else crop, atol=1e-5):
                        found = (dy, dx, flip)
        assert found is not None, f"image {i} is not a crop (+flip) of its padded original"
        seen.add(found)
    flips = {f for _, _, f in seen}
    offsets = {(dy, dx) for dy, dx, _ in seen}
    assert flips == {False, True}
    assert len(offsets) > 20  # 81 possible offsets, 256 images


def test_augmentation_is_a_function_of_seed_epoch_and_index_only(archive_root):
    root, _ = archive_root
    task = _task(root)
    rng = task.train_set.sample_random
    indices = list(range(16))
    a = task.train_set.__getitems__(indices)[0]
    torch.manual_seed(123)  # the global RNG plays no part
    again = task.train_set.__getitems__(indices)[0]
    assert torch.equal(a, again)
    # Image 5 gets the same crop whatever batch (and position in it) it is loaded in.
    assert torch.equal(task.train_set.__getitems__([9, 5])[0][1], a[5])
    rng.set_epoch(rng.seed, 1)
    next_epoch = task.train_set.__getitems__(indices)[0]
    rng.set_epoch(rng.seed + 1, 0)
    other_seed = task.train_set.__getitems__(indices)[0]
    assert not torch.equal(a, next_epoch) and not torch.equal(a, other_seed)


def test_eval_set_is_not_augmented(archive_root):
    root, _ = archive_root
    task = _task(root)
    indices = list(range(8))
    a = task.val_set.__getitems__(indices)[0]
    b = task.val_set.__getitems__(indices)[0]
    assert torch.equal(a, b)
    raw = torch.from_numpy(c10.load_arrays(str(root))["x_test"][:8])
    assert torch.equal(a, c10.Normalize()((raw, None))[0])


def test_md5_mismatch_is_a_usage_error(tmp_path):
    path = tmp_path / "file.bin"
    path.write_bytes(b"not cifar")
    with pytest.raises(UsageError, match="checksum mismatch"):
        c10.verify_md5(str(path), c10.MD5)
    c10.verify_md5(str(path), c10.md5sum(str(path)))


def test_download_verifies_and_is_atomic(tmp_path):
    src = tmp_path / "src.tar.gz"
    src.write_bytes(b"x" * 5000)
    dest = tmp_path / "out" / c10.ARCHIVE
    with pytest.raises(UsageError, match="checksum mismatch"):
        c10.download(src.as_uri(), str(dest), c10.MD5)
    assert not dest.exists() and os.listdir(dest.parent) == []  # no partial or temp file left
    c10.download(src.as_uri(), str(dest), c10.md5sum(str(src)))
    assert dest.read_bytes() == src.read_bytes()


def test_download_failure_names_the_fix(tmp_path):
    missing = (tmp_path / "nowhere.tar.gz").as_uri()
    with pytest.raises(UsageError, match=r"download failed .*place cifar-10-python.tar.gz in"):
        c10.load_arrays(str(tmp_path / "empty"), url=missing)


def test_bad_options_and_models(archive_root):
    root, _ = archive_root
    with pytest.raises(UsageError, match="task.model"):
        _task(root, model="vgg")
    with pytest.raises(UsageError, match="task.options.augmnt"):
        _task(root, augmnt=True)
    with pytest.raises(UsageError, match=r"task\.options\.subset: must be in \[0, 50000\] \(0 = all images\); got -1"):
        _task(root, subset=-1)
    with pytest.raises(UsageError, match=r"task\.options\.val_subset: must be in \[0, 10000\]"):
        _task(root, val_subset=10_001)
    with pytest.raises(UsageError, match=r"task\.options\.augment: expected true or false; got 'sometimes'"):
        _task(root, augment="sometimes")


def test_options_from_the_command_line_are_converted(archive_root):
    root, _ = archive_root
    task = _task(root, augment="false", subset="16", val_subset="4")
    assert len(task.train_set) == 16 and len(task.val_set) == 4
    assert task.description.endswith("no augmentation)")


def test_full_resnet18_shape(one_thread):
    from launcher.models.resnet import resnet18

    model = resnet18()
    assert sum(p.numel() for p in model.parameters()) == 11_173_962  # the standard CIFAR ResNet-18
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_few_steps_reduce_loss(archive_root, one_thread):
    root, _ = archive_root
    torch.manual_seed(0)
    task = _task(root, augment=False)
    batch = task.collate_fn(task.train_set.__getitems__(list(range(32))))
    inputs, targets = task.split(batch)
    optimizer = torch.optim.Adam(task.model.parameters(), lr=1e-2)
    losses = fit_batch(task, optimizer, inputs, targets, steps=15)
    assert losses[-1] < 0.5 * losses[0]
    task.model.eval()
    with torch.no_grad():
        outputs = task.model(inputs)
        metrics = task.metrics(outputs, targets)
    assert metrics["loss"].shape == (32,) and metrics["accuracy"].shape == (32,)
    # accuracy is per-sample correctness of the arg-max class, and the batch was fitted well enough to show it
    correct = (outputs.argmax(dim=-1) == targets).to(metrics["accuracy"].dtype)
    assert torch.equal(metrics["accuracy"], correct)
    assert correct.mean() > 0.5
