"""Task options: each task's pydantic model, `launcher.tasks.parse_options`, and the docs generated from them."""

from __future__ import annotations

import dataclasses
import re
import textwrap
from pathlib import Path

import pytest
from pydantic import model_validator

from launcher.config import DataConfig, TaskConfig, load_config
from launcher.errors import UsageError
from launcher.tasks import (
    BUILTIN,
    build_task,
    builtin_options,
    check_options,
    options_table,
    parse_options,
    task_options,
)
from launcher.tasks.cifar10 import CIFAR10Options
from launcher.tasks.gpt import GPTOptions
from launcher.tasks.mnist1d import MNIST1DOptions

from helpers import ROOT


def _parse(model, name="gpt", **options):
    return parse_options(model, TaskConfig(name=name, options=options))


def _error(model, name="gpt", **options) -> str:
    with pytest.raises(UsageError) as err:
        _parse(model, name, **options)
    message = str(err.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------------------------------------
# Defaults and typed access
# ---------------------------------------------------------------------------------------------


def test_defaults_are_the_documented_ones():
    assert dataclasses.asdict(_parse(MNIST1DOptions, "mnist1d")) == {"seed": 42, "num_train": 4000, "num_test": 1000}
    assert dataclasses.asdict(_parse(CIFAR10Options, "cifar10")) == {"augment": True, "subset": 0, "val_subset": 0}
    assert dataclasses.asdict(_parse(GPTOptions)) == {
        "n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 128, "dropout": 0.0, "text_file": "",
        "max_bytes": 8_000_000, "val_fraction": 0.1, "samples_per_epoch": 20_000, "val_samples": 1_000}


def test_given_values_override_defaults_and_options_are_frozen():
    opts = _parse(GPTOptions, n_layer=2, dropout=0.1)
    assert (opts.n_layer, opts.dropout, opts.n_head) == (2, 0.1, 4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.n_layer = 3


def test_every_builtin_declares_its_options():
    models = builtin_options()
    assert set(models) == set(BUILTIN)
    for model in models.values():
        for name, info in model.__pydantic_fields__.items():
            assert info.description, f"{model.__name__}.{name} has no docstring"


# ---------------------------------------------------------------------------------------------
# Mistakes: one line naming task.options.<key>
# ---------------------------------------------------------------------------------------------


def test_unknown_key_suggests_the_closest_option():
    message = _error(MNIST1DOptions, "mnist1d", num_trian=5)
    assert message == "unknown option task.options.num_trian for task mnist1d; did you mean task.options.num_train?"
    assert "did you mean task.options.n_layer?" in _error(GPTOptions, n_layers=2)


def test_unknown_key_without_a_near_miss_lists_the_options():
    assert _error(CIFAR10Options, "cifar10", colour=1) == (
        "unknown option task.options.colour for task cifar10; cifar10 accepts augment, subset, val_subset")


@pytest.mark.parametrize(
    ("model", "options", "expected"),
    [
        (MNIST1DOptions, {"num_train": "many"}, "task.options.num_train: expected an integer; got 'many'"),
        (MNIST1DOptions, {"num_train": 2.5}, "task.options.num_train: expected an integer; got 2.5"),
        (CIFAR10Options, {"augment": "maybe"}, "task.options.augment: expected true or false; got 'maybe'"),
        (GPTOptions, {"dropout": "x"}, "task.options.dropout: expected a number; got 'x'"),
        (GPTOptions, {"text_file": ["a", "b"]}, "task.options.text_file: expected a string; got ['a', 'b']"),
    ],
)
def test_wrong_type_names_the_key_and_the_type(model, options, expected):
    assert _error(model, **options) == expected


@pytest.mark.parametrize(
    ("model", "options", "expected"),
    [
        (MNIST1DOptions, {"num_train": 0}, "task.options.num_train: must be >= 1; got 0"),
        (MNIST1DOptions, {"seed": -1}, "task.options.seed: must be in [0, 4294967295]; got -1"),
        (CIFAR10Options, {"subset": -1}, "task.options.subset: must be in [0, 50000] (0 = all images); got -1"),
        (CIFAR10Options, {"val_subset": 10_001},
         "task.options.val_subset: must be in [0, 10000] (0 = all images); got 10001"),
        (GPTOptions, {"n_layer": 0}, "task.options.n_layer: must be >= 1; got 0"),
        (GPTOptions, {"dropout": 1}, "task.options.dropout: must be in [0, 1); got 1.0"),
        (GPTOptions, {"val_fraction": 0}, "task.options.val_fraction: must be in (0, 1); got 0.0"),
        (GPTOptions, {"n_embd": 30, "n_head": 4}, "task.options.n_embd: must be a multiple of n_head (4); got 30"),
    ],
)
def test_out_of_range_names_the_key_and_the_allowed_range(model, options, expected):
    assert _error(model, **options) == expected


def test_build_task_reports_option_mistakes_before_any_data_is_loaded(tmp_path):
    # data.root is never touched: the options are checked first.
    with pytest.raises(UsageError, match=r"^task\.options\.subset: must be in \[0, 50000\]"):
        build_task(TaskConfig(name="cifar10", options={"subset": 60_000}), DataConfig(root=str(tmp_path / "none")))
    assert not (tmp_path / "none").exists()


# ---------------------------------------------------------------------------------------------
# Values from the command line and from YAML
# ---------------------------------------------------------------------------------------------


def test_cli_strings_are_converted_like_every_recipe_value():
    cfg = load_config(ROOT / "recipes" / "mnist1d.yaml", {"--task.options.num_train": "512",
                                                          "--task.options.num_test": "1_000",
                                                          "--task.options.seed": "7.0"})
    opts = parse_options(MNIST1DOptions, cfg.task)
    assert (opts.num_train, opts.num_test, opts.seed) == (512, 1000, 7)
    assert type(opts.num_train) is int
    cfg = load_config(None, {"task.name": "cifar10", "--task.options.augment": "false",
                             "--task.options.subset": "256"})
    opts = parse_options(CIFAR10Options, cfg.task)
    assert opts.augment is False and opts.subset == 256
    cfg = load_config(None, {"task.name": "gpt", "--task.options.dropout": "0.1", "--task.options.text_file": "123"})
    opts = parse_options(GPTOptions, cfg.task)
    assert opts.dropout == 0.1 and opts.text_file == "123"


def test_yaml_values_are_converted(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("task:\n  name: gpt\n  options:\n    n_layer: 2.0\n    dropout: 0\n    text_file: 1984\n")
    opts = parse_options(GPTOptions, load_config(recipe).task)
    assert opts.n_layer == 2 and type(opts.n_layer) is int
    assert opts.text_file == "1984"
    assert opts.dropout == 0.0 and type(opts.dropout) is float


def test_a_cli_mistake_reads_as_one_line(tmp_path):
    cfg = load_config(None, {"task.name": "gpt", "--task.options.n_head": "three"})
    with pytest.raises(UsageError, match=r"^task\.options\.n_head: expected an integer; got 'three'$"):
        parse_options(GPTOptions, cfg.task)


# ---------------------------------------------------------------------------------------------
# A task of your own
# ---------------------------------------------------------------------------------------------

PLUGIN = '''
    from typing import Literal

    import torch
    import torch.nn.functional as F
    from pydantic import model_validator

    from launcher.data import TensorBatchDataset
    from launcher.tasks import Task, parse_options, problem, setting, task_options


    @task_options
    class BlobsOptions:
        dims: int
        """Dimensions of each point (required)."""
        n: int = setting(1024, ge=16)
        """Points in all."""
        classes: int = setting(3, ge=2, le=10)
        """Gaussian blobs, one per class."""
        spread: float = setting(1.0, gt=0)
        """Standard deviation of each blob."""
        init: Literal["normal", "uniform"] = "normal"
        """How the blob centres are drawn."""

        @model_validator(mode="after")
        def _enough(self):
            if self.n < 4 * self.classes:
                raise problem(f"must give at least 4 points per class ({4 * self.classes}); got {self.n}", ".n")
            return self


    def build(task, data):
        opts = parse_options(BlobsOptions, task)
        g = torch.Generator().manual_seed(0)
        centers = torch.randn(opts.classes, opts.dims, generator=g) * 3
        y = torch.randint(0, opts.classes, (opts.n,), generator=g)
        x = centers[y] + opts.spread * torch.randn(opts.n, opts.dims, generator=g)
        split = opts.n * 3 // 4
        return Task(
            model=torch.nn.Linear(opts.dims, opts.classes),
            train_set=TensorBatchDataset(x[:split], y[:split]),
            val_set=TensorBatchDataset(x[split:], y[split:]),
            loss=lambda out, t: F.cross_entropy(out, t),
            metrics=lambda out, t: {"loss": F.cross_entropy(out, t, reduction="none")},
            collate_fn=TensorBatchDataset.collate,
            description=f"{opts.classes} blobs in {opts.dims} dimensions ({opts.init} centres)",
        )
'''


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    (tmp_path / "blob_tasks.py").write_text(textwrap.dedent(PLUGIN))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "blob_tasks:build"


def _build_plugin(name, **overrides):
    cfg = load_config(None, {"task.name": name, **{f"--task.options.{k}": v for k, v in overrides.items()}})
    return build_task(cfg.task, cfg.data)


def test_plugin_task_uses_the_same_tool(plugin):
    task = _build_plugin(plugin, dims="4", n="64", classes="2", init="uniform")
    assert task.description == "2 blobs in 4 dimensions (uniform centres)"
    assert len(task.train_set) == 48 and task.model.in_features == 4


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"dims": 4, "clases": 2}, "unknown option task.options.clases for task blob_tasks:build; "
                                   "did you mean task.options.classes?"),
        ({"dims": 4, "classes": "11"}, "task.options.classes: must be in [2, 10]; got 11"),
        ({"dims": 4, "spread": "wide"}, "task.options.spread: expected a number; got 'wide'"),
        ({"dims": 4, "spread": "0"}, "task.options.spread: must be > 0; got 0.0"),
        ({"dims": 4, "init": "zeros"}, "task.options.init: must be one of normal, uniform; got 'zeros'"),
        ({"dims": 4, "n": 16, "classes": 5},
         "task.options.n: must give at least 4 points per class (20); got 16"),
        ({}, "task.options.dims: task blob_tasks:build needs this option; set it in the recipe "
             "(task: options: {dims: ...}) or with --task.options.dims=VALUE"),
    ],
)
def test_plugin_task_mistakes(plugin, overrides, expected):
    with pytest.raises(UsageError) as err:
        _build_plugin(plugin, **overrides)
    assert str(err.value) == expected


@task_options
class Opts:
    k: int = 1
    """A number."""
    out: Path = Path(".")
    """A path: not a type the config layer converts, so pydantic does."""

    @model_validator(mode="after")
    def _check(self) -> Opts:
        if self.k == 3:
            raise ValueError("k must not be 3 (a reserved value); pick another")
        if self.k == 4:
            raise UsageError("task.options.k: 4 is reserved too; pick another")
        return self


def test_plain_validator_errors_and_other_types():
    assert _error(Opts, "mine:build", k=3) == "task.options: k must not be 3 (a reserved value); pick another"
    assert _error(Opts, "mine:build", k=4) == "task.options.k: 4 is reserved too; pick another"
    assert _parse(Opts, "mine:build", out="/tmp/x").out == Path("/tmp/x")
    assert _error(Opts, "mine:build", out=3).startswith("task.options.out: input is not a valid path")


def test_check_options_dict_shorthand_still_works():
    assert check_options("blobs", {"n": "512"}, {"n": 256, "noise": 0.1}) == {"n": 512, "noise": 0.1}
    with pytest.raises(UsageError, match=r"^unknown option task\.options\.m for task blobs; blobs accepts n, noise$"):
        check_options("blobs", {"m": 3}, {"n": 256, "noise": 0.1})
    with pytest.raises(UsageError, match=r"^task\.options\.noise: expected a number; got 'lots'$"):
        check_options("blobs", {"noise": "lots"}, {"n": 256, "noise": 0.1})


# ---------------------------------------------------------------------------------------------
# Docs
# ---------------------------------------------------------------------------------------------


def test_docs_list_every_builtin_option_as_the_models_declare_them():
    """docs/cli.md holds `python -m launcher.tasks`'s tables; regenerate them when an option changes."""
    docs = (ROOT / "docs" / "cli.md").read_text()
    for name, model in builtin_options().items():
        assert f"### `{name}`\n\n{options_table(model)}\n" in docs, f"docs/cli.md: {name}'s options are out of date"
    readme = (ROOT / "README.md").read_text()
    for name, model in builtin_options().items():
        row = next(line for line in readme.splitlines() if re.match(rf"\| `{name}` \|", line))
        assert all(f"`{key}`" in row for key in model.__pydantic_fields__), row


def test_readme_plugin_example_works_as_documented(tmp_path, monkeypatch):
    readme = (ROOT / "README.md").read_text()
    byo = readme[readme.index("## Bring your own task"):]
    code = re.search(r"```python\n(# my_tasks\.py.*?)```", byo, re.S).group(1)
    (tmp_path / "readme_tasks.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = load_config(None, {"task.name": "readme_tasks:build", "--task.options.n": "512"})
    task = build_task(cfg.task, cfg.data)
    assert len(task.train_set) == 384 and len(task.val_set) == 128
    for option, value in (("nn", "512"), ("n", "8")):
        cfg = load_config(None, {"task.name": "readme_tasks:build", f"--task.options.{option}": value})
        with pytest.raises(UsageError) as err:
            build_task(cfg.task, cfg.data)
        assert f"`{str(err.value).replace('readme_tasks', 'my_tasks')}`" in byo
