"""Bitwise resume mid-epoch for tasks whose data is random: GPT windows, CIFAR-10 crops and flips, and
a task module of the user's own (written into tmp_path) that draws noise from `SampleRandom`.

Each test: an uninterrupted run, then the same run SIGKILLed right after a step that follows a
mid-epoch checkpoint and continued with `--resume auto`; every `train/loss`, `lr` and `val/loss`
must be equal bit for bit.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from helpers import read_metrics, train

pytestmark = pytest.mark.timeout(600)


def columns(run_dir: Path) -> tuple[list, list]:
    steps, evals = read_metrics(run_dir)
    return ([(r["step"], r["lr"], r["train/loss"]) for r in steps], [(r["step"], r["val/loss"]) for r in evals])


def kill_and_resume(tmp_path: Path, args: list[str], kill_at: int, resumed_from: int, ref_args: tuple = (),
                    run_args: tuple = (), **env) -> tuple[list, list]:
    ref, run = tmp_path / "ref", tmp_path / "run"
    result = train(*args, *ref_args, "--output_dir", str(ref), **env)
    args = [*args, *run_args]
    assert result.returncode == 0, result.stderr[-3000:]
    killed = train(*args, "--output_dir", str(run), LAUNCHER_TEST_KILL_AT_STEP=str(kill_at), **env)
    assert killed.returncode == -9, killed.stderr[-3000:]
    resumed = train(*args, "--output_dir", str(run), "--resume", "auto", **env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {run / 'checkpoints' / f'step_{resumed_from:08d}'}:" in resumed.stdout
    (steps_ref, evals_ref), (steps, evals) = columns(ref), columns(run)
    assert [s[0] for s in steps] == [s[0] for s in steps_ref] and len(evals_ref) >= 2
    assert steps == steps_ref  # lr and train/loss bit for bit at every step
    assert evals == evals_ref
    return steps, evals


def test_gpt_tiny_mid_epoch_resume_is_bitwise(tmp_path):
    # 1 layer, 320 windows an epoch (10 steps of 32), 3 epochs, a checkpoint every 3 steps; killed
    # after step 14, resumed from the mid-epoch checkpoint at step 12.
    args = ["--recipe", "recipes/gpt_tiny.yaml", "--task.options.n_layer=1", "--task.options.n_embd=32",
            "--task.options.block_size=32", "--task.options.max_bytes=200000", "--task.options.samples_per_epoch=320",
            "--task.options.val_samples=64", "--train.num_epochs=3", "--schedule.warmup_steps=5",
            "--checkpoint.every_n_steps=3", "--train.progress_bar=off"]
    kill_and_resume(tmp_path, args, kill_at=14, resumed_from=12)


def test_cifar10_augmented_mid_epoch_resume_is_bitwise(tmp_path):
    from test_task_cifar10 import _batches, _write_archive

    from launcher.tasks import cifar10 as c10

    _write_archive(tmp_path / c10.ARCHIVE, _batches())  # 40 training, 8 test images
    args = ["--recipe", "recipes/cifar10_resnet18.yaml", "--task.model=resnet_tiny", "--task.options.augment=true",
            f"--data.root={tmp_path}", "--train.batch_size=8", "--train.num_epochs=3",
            "--checkpoint.every_n_steps=2", "--train.progress_bar=off", "--train.mixed_precision=no",
            "--train.channels_last=false", "--train.compile=false"]
    # The uninterrupted run loads through a DataLoader with a worker process (which copies the dataset,
    # and its sample_random, at every epoch's start); the killed one in process: the same crops either way.
    kill_and_resume(tmp_path, args, kill_at=8, resumed_from=6, ref_args=("--data.num_workers=1",),
                    run_args=("--data.num_workers=0",))


TASK = textwrap.dedent('''
    """A task of the user's own: noisy linear regression whose noise is drawn per sample and per epoch."""
    import torch
    from torch.utils.data import Dataset

    from launcher.data import SampleRandom
    from launcher.tasks import Task


    class NoisyPoints(Dataset):
        def __init__(self, n, noise):
            g = torch.Generator().manual_seed(0)
            self.x = torch.randn(n, 4, generator=g)
            self.y = self.x @ torch.tensor([1.0, -2.0, 0.5, 3.0])
            self.noise = noise
            self.sample_random = SampleRandom() if noise else None

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            x = self.x[i]
            if self.noise:  # a fresh perturbation of sample i every epoch, the same on every resume
                x = x + self.noise * (self.sample_random.uniform([i], 4)[0].float() - 0.5)
            return x, self.y[i]


    def build(task, data):
        model = torch.nn.Linear(4, 1)
        return Task(model=model, train_set=NoisyPoints(96, 0.5), val_set=NoisyPoints(32, 0.0),
                    loss=lambda out, y: ((out[:, 0] - y) ** 2).mean(),
                    metrics=lambda out, y: {"loss": (out[:, 0] - y) ** 2})
''')


def test_own_task_with_sample_random_resumes_bitwise(tmp_path):
    (tmp_path / "noisy_task.py").write_text(TASK)
    args = ["--recipe", "recipes/mnist1d.yaml", "--task.name=noisy_task:build", "--task.model=",
            "--train.batch_size=8", "--train.num_epochs=3", "--checkpoint.every_n_steps=5",
            "--train.progress_bar=off", "--schedule.plateau.enabled=false"]
    steps, _ = kill_and_resume(tmp_path, args, kill_at=7, resumed_from=5,
                               PYTHONPATH=f"{tmp_path}:{Path(__file__).resolve().parents[1]}")
    assert len(steps) == 36
