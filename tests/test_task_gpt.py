"""The gpt task: corpus, split, windows, determinism, options, and a few learning steps."""

from __future__ import annotations

import math

import pytest
import torch

from launcher.config import DataConfig, TaskConfig
from launcher.errors import UsageError
from launcher.tasks import build_task
from launcher.tasks import gpt as gpt_task

from helpers import fit_batch

TINY = {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 16, "samples_per_epoch": 64, "val_samples": 8}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_bytes(bytes(range(256)) * 20)  # 5120 bytes, each byte followed by the next one
    return path


def _task(**options):
    return build_task(TaskConfig(name="gpt", options={**TINY, **options}), DataConfig())


def test_windows_are_shifted_by_one(text_file):
    task = _task(text_file=str(text_file))
    torch.manual_seed(0)
    x, y = task.collate_fn(task.train_set.__getitems__([0, 1, 2, 3]))
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(y, (x + 1) % 256)  # the corpus counts up byte by byte
    one_x, one_y = task.train_set[2]
    assert one_x.shape == one_y.shape == (16,) and torch.equal(one_y, (one_x + 1) % 256)


def test_split_is_last_tenth_and_val_windows_do_not_overlap(text_file):
    data = text_file.read_bytes()
    train, val = gpt_task.split_corpus(data, 0.1)
    assert len(val) == 512 and bytes(train.tolist()) + bytes(val.tolist()) == data
    task = _task(text_file=str(text_file), val_samples=1000)
    starts = task.val_set.starts.tolist()
    assert len(starts) == 512 // 17
    assert all(b - a >= 17 for a, b in zip(starts, starts[1:]))
    assert starts[-1] + 17 <= 512
    x, _ = task.val_set.__getitems__(list(range(len(starts))))
    assert bytes(x[0].tolist()) == data[len(train):len(train) + 16]
    again, _ = task.val_set.__getitems__(list(range(len(starts))))
    assert torch.equal(x, again)  # validation windows are fixed
    limited = _task(text_file=str(text_file), val_samples=5)
    assert len(limited.val_set) == 5 and limited.val_set.starts[-1] > 400  # spread over the split


def test_train_windows_stay_in_their_slice_and_depend_on_seed_epoch_and_index_only(text_file):
    task = _task(text_file=str(text_file), samples_per_epoch=64)
    train = task.train_set
    assert len(train) == 64
    slice_len = (len(train.data) - 16) // 64
    assert train.jitter == slice_len - 1
    assert int(train.starts[-1]) + train.jitter <= train.max_start == len(train.data) - 17
    draws = []
    for epoch in range(100):
        train.sample_random.set_epoch(0, epoch)
        draws.append(train.__getitems__(list(range(64)))[0][:, 0])
    assert len(torch.unique(torch.stack(draws)[:, 10])) > 20  # window 10 moves within its slice from epoch to epoch
    train.sample_random.set_epoch(3, 7)
    torch.manual_seed(3)
    a = train.__getitems__([5, 9])
    torch.manual_seed(4)  # the global RNG plays no part
    b = train.__getitems__([9, 5])  # nor the batch a window is loaded in
    assert torch.equal(a[0][0], b[0][1]) and torch.equal(a[1][1], b[1][0])
    for row, i in zip(a[0], (5, 9)):
        begin = int(train.starts[i])
        candidates = {bytes(train.data[s:s + 16].tolist()) for s in range(begin, begin + slice_len)}
        assert bytes(row.tolist()) in candidates


def test_default_corpus_is_deterministic_stdlib_source():
    a = gpt_task.stdlib_corpus(200_000)
    b = gpt_task.stdlib_corpus(200_000)
    assert a == b and len(a) == 200_000
    assert b"def " in a and b"import " in a
    t1, t2 = _task(max_bytes=200_000), _task(max_bytes=200_000)
    assert torch.equal(t1.train_set.starts, t2.train_set.starts) and t1.train_set.jitter == t2.train_set.jitter
    assert torch.equal(t1.val_set.starts, t2.val_set.starts)
    assert torch.equal(t1.train_set.data, t2.train_set.data) and torch.equal(t1.val_set.data, t2.val_set.data)
    assert len(t1.train_set.data) == 180_000 and len(t1.val_set.data) == 20_000
    assert len(t1.train_set) == 64


def test_stdlib_corpus_skips_tests_and_site_packages(tmp_path):
    for rel, text in {"a.py": "A", "b/c.py": "C", "test/t.py": "T", "b/tests/u.py": "U",
                      "site-packages/s.py": "S", "z.txt": "Z"}.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    assert gpt_task.stdlib_corpus(100, root=str(tmp_path)) == b"AC"
    assert gpt_task.stdlib_corpus(1, root=str(tmp_path)) == b"A"


def test_task_fields(text_file):
    task = _task(text_file=str(text_file))
    assert task.tokens_per_sample == 16
    assert task.flops_per_token == 6 * task.model.num_params() + 12 * 1 * 32 * 16
    out = task.finalize({"loss": math.log(4.0), "accuracy": 0.5})
    assert out["perplexity"] == pytest.approx(4.0) and out["bits_per_byte"] == pytest.approx(2.0)
    assert out["accuracy"] == 0.5


def test_user_errors(tmp_path, text_file):
    with pytest.raises(UsageError, match="task.options.text_file"):
        _task(text_file=str(tmp_path / "missing.txt"))
    short = tmp_path / "short.txt"
    short.write_text("tiny")
    with pytest.raises(UsageError, match="task.options.block_size"):
        _task(text_file=str(short))
    with pytest.raises(UsageError, match=r"^task\.options\.n_embd: must be a multiple of n_head \(4\); got 30$"):
        _task(text_file=str(text_file), n_embd=30, n_head=4)
    with pytest.raises(UsageError, match=r"task\.options\.n_layers for task gpt; did you mean task\.options\.n_layer\?"):
        _task(text_file=str(text_file), n_layers=2)
    with pytest.raises(UsageError, match=r"^task\.options\.val_fraction: must be in \(0, 1\); got 1\.0$"):
        _task(text_file=str(text_file), val_fraction="1")
    with pytest.raises(UsageError, match=r"^task\.options\.block_size: must be >= 1; got 0$"):
        _task(text_file=str(text_file), block_size=0)
    with pytest.raises(UsageError, match="task.model"):
        build_task(TaskConfig(name="gpt", model="llama", options=TINY), DataConfig())


def test_few_steps_reduce_loss(text_file):
    torch.manual_seed(0)
    task = _task(text_file=str(text_file))
    optimizer = torch.optim.AdamW(task.model.parameters(), lr=3e-3)
    batch = task.collate_fn(task.train_set.__getitems__(list(range(32))))
    inputs, targets = task.split(batch)
    losses = fit_batch(task, optimizer, inputs, targets, steps=30)
    assert losses[0] == pytest.approx(math.log(256), rel=0.05)  # near-uniform at init
    assert losses[-1] < 0.6 * losses[0]
    task.model.eval()
    with torch.no_grad():
        vx, vy = task.val_set.__getitems__(list(range(len(task.val_set))))
        metrics = task.metrics(task.model(vx), vy)
    assert metrics["loss"].shape == metrics["accuracy"].shape == (len(task.val_set),)
    assert metrics["loss"].mean() < losses[0]
