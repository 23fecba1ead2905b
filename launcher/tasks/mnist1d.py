"""MNIST-1D (Greydanus & Kobak, "Scaling Down Deep Learning with MNIST-1D", ICML 2024).

4,000 training and 1,000 test signals of length 40 in 10 classes, generated locally by the
`mnist1d` package from its built-in templates (seed 42, the paper's frozen dataset) and cached as
`.npz` under `data_root()/mnist1d/`. The paper's test accuracies are our external yardstick:
logistic regression 32%, MLP 68%, CNN 94%.

Options (`task.options`): `MNIST1DOptions` (`seed`, default 42; `num_train`/`num_test`, defaults
4000/1000). Models (`task.model`): `cnn` (default), `mlp`, `linear`.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from launcher.config import DataConfig, TaskConfig
from launcher.data import TensorBatchDataset
from launcher.errors import UsageError
from launcher.tasks import Task, data_root, parse_options, setting, task_options
from launcher.tasks.common import classification_loss, classification_metrics, load_arrays_npz, save_arrays


@task_options
class MNIST1DOptions:
    seed: int = setting(42, ge=0, le=2**32 - 1)
    """Seed of the generated dataset (42 = the paper's frozen dataset)."""
    num_train: int = setting(4000, ge=1)
    """Training signals."""
    num_test: int = setting(1000, ge=1)
    """Test (validation) signals."""


class ConvNet(nn.Module):
    """The paper's CNN: three Conv1d layers of 25 channels (kernel 5/3/3, stride 2, padding 1), ReLU, Linear(125, 10)."""

    def __init__(self, channels: int = 25, num_classes: int = 10, length: int = 40):
        super().__init__()
        self.conv1 = nn.Conv1d(1, channels, 5, stride=2, padding=1)
        self.conv2 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        self.conv3 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        out_len = length
        for k in (5, 3, 3):
            out_len = (out_len + 2 - k) // 2 + 1
        self.linear = nn.Linear(channels * out_len, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.unsqueeze(1)
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.relu(self.conv3(x))
        return self.linear(x.flatten(1))


class MLP(nn.Module):
    """The paper's MLP: 40 -> 100 -> 100 -> 10 with ReLU."""

    def __init__(self, hidden: int = 100, num_classes: int = 10, length: int = 40):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(length, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


MODELS = {"cnn": ConvNet, "mlp": MLP, "linear": lambda: nn.Linear(40, 10)}


def load_arrays(root: str, seed: int = 42, num_train: int = 4000, num_test: int = 1000) -> dict[str, np.ndarray]:
    """The dataset as arrays x, y, x_test, y_test; built once with `mnist1d.make_dataset` and cached.

    Never calls `mnist1d.data.get_dataset` (that one downloads). Concurrent ranks may both build it;
    the cache file is written under a temporary name and renamed, so readers never see half a file.
    """
    cache_dir = os.path.join(root, "mnist1d")
    path = os.path.join(cache_dir, f"mnist1d_seed{seed}_{num_train}_{num_test}.npz")
    if os.path.exists(path):
        return load_arrays_npz(path)
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.seed = seed
    args.num_samples = num_train + num_test
    args.train_split = num_train / (num_train + num_test)
    data = make_dataset(args)
    # mnist1d rounds the split; re-split exactly (identity for the standard 4,000 / 1,000).
    x = np.concatenate([data["x"], data["x_test"]])
    y = np.concatenate([data["y"], data["y_test"]])
    arrays = {"x": x[:num_train], "y": y[:num_train], "x_test": x[num_train:], "y_test": y[num_train:]}
    os.makedirs(cache_dir, exist_ok=True)
    save_arrays(path, arrays)
    return arrays


def build(task: TaskConfig, data: DataConfig) -> Task:
    opts = parse_options(MNIST1DOptions, task)
    model_name = task.model or "cnn"
    if model_name not in MODELS:
        raise UsageError(f"task.model: mnist1d has no model {model_name!r}; use one of {', '.join(MODELS)}")
    arrays = load_arrays(data_root(data), opts.seed, opts.num_train, opts.num_test)
    x = torch.from_numpy(arrays["x"]).float()
    y = torch.from_numpy(arrays["y"]).long()
    x_test = torch.from_numpy(arrays["x_test"]).float()
    y_test = torch.from_numpy(arrays["y_test"]).long()
    return Task(
        model=MODELS[model_name](),
        train_set=TensorBatchDataset(x, y),
        val_set=TensorBatchDataset(x_test, y_test),
        loss=classification_loss,
        metrics=classification_metrics,
        collate_fn=TensorBatchDataset.collate,
        description=f"MNIST-1D {model_name} ({len(x)} train / {len(x_test)} test)",
    )
