"""The recipe layer: merge order, type coercion, and every class of user error."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from launcher.config import Config, flatten, load_config, to_dict, to_yaml, valid_keys
from launcher.errors import UsageError

from helpers import ROOT


def write(tmp_path: Path, text: str, name: str = "r.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_defaults_yaml_cli_precedence(tmp_path):
    recipe = write(tmp_path, "optim:\n  lr: 0.002\n  weight_decay: 0.1\ntrain:\n  num_epochs: 7\n")
    cfg = load_config(recipe, {"optim.lr": 0.005})
    assert cfg.optim.lr == 0.005  # CLI beats YAML
    assert cfg.optim.weight_decay == 0.1  # YAML beats default
    assert cfg.train.num_epochs == 7
    assert cfg.train.batch_size == Config().train.batch_size  # default
    assert cfg.name == "r"  # from the recipe file name


@pytest.mark.parametrize(
    ("key", "raw", "expected"),
    [
        ("optim.lr", "5e-3", 0.005),  # YAML 1.1 reads 5e-3 as a string
        ("optim.lr", 1, 1.0),
        ("train.num_epochs", "30", 30),
        ("train.num_epochs", 30.0, 30),
        ("train.compile", "true", True),
        ("train.compile", "False", False),
        ("train.compile", True, True),
        ("optim.betas", [0.9, 0.95], (0.9, 0.95)),
        ("optim.betas", "0.8,0.9", (0.8, 0.9)),
        ("tracking.wandb.tags", "a,b", ["a", "b"]),
        ("tracking.wandb.tags", ("x",), ["x"]),
        ("task.name", 123, "123"),
        ("schedule.plateau.patience", "4", 4),
    ],
)
def test_override_coercion(key, raw, expected):
    cfg = load_config(None, {key: raw})
    value = cfg
    for part in key.split("."):
        value = getattr(value, part)
    assert value == expected
    assert type(value) is type(expected)


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"optim.lr": -1}, "optim.lr: must be a positive number"),
        ({"optim.lr": 0}, "optim.lr"),
        ({"optim.lrr": 0.1}, "did you mean optim.lr?"),
        ({"trian.num_epochs": 3}, "did you mean train.num_epochs?"),
        ({"train.num_epochs": "abc"}, "train.num_epochs: expected an integer; got 'abc'"),
        ({"train.num_epochs": 0}, "train.num_epochs: must be >= 1"),
        ({"train.num_epochs": 2.5}, "train.num_epochs: expected an integer"),
        ({"train.compile": "maybe"}, "train.compile: expected true or false"),
        ({"train.batch_size": True}, "train.batch_size: expected an integer"),
        ({"optim.betas": [0.9]}, "optim.betas: expected 2 values"),
        ({"optim.name": "lamb"}, "optim.name: must be one of adamw, adam, sgd"),
        ({"schedule.decay": "step"}, "schedule.decay: must be one of"),
        ({"schedule.decay_rate": 1.5}, "schedule.decay_rate"),
        ({"schedule.warmup_steps": 10, "schedule.warmup_epochs": 1}, "not both"),
        ({"schedule.plateau.factor": 1.0}, "schedule.plateau.factor: must be in (0, 1)"),
        ({"schedule.plateau.mode": "up"}, "schedule.plateau.mode"),
        ({"optim.lr_scaling": "linear"}, "optim.reference_batch_size: must be set"),
        ({"optim.lr.x": 1}, "unknown recipe key 'optim.lr.x'; did you mean optim.lr?"),
        ({"optim": 3}, "optim: expected a mapping"),
        ({"train.mixed_precision": "fp8"}, "train.mixed_precision: must be one of"),
        ({"train.mixed_precision": False}, "got False (YAML reads an unquoted no, yes, off or on as true/false: "
                                           "quote it, e.g. 'no')"),
        ({"optim.betas": "0.9,x"}, "optim.betas[1]: expected a number; got 'x'"),
        ({"train.max_steps": -1}, "train.max_steps: must be >= 0 (0 = no cap); got -1"),
        ({"schedule.warmup_start_factor": 2}, "schedule.warmup_start_factor: must be in [0, 1]; got 2.0"),
        ({"tracking.wandb.mode": "on"}, "tracking.wandb.mode: must be online, offline, disabled or empty (auto)"),
        ({"checkpoint.signal": "usr1"}, "checkpoint.signal: must be a signal name such as SIGUSR1; got 'usr1'"),
    ],
)
def test_errors_name_the_key(overrides, fragment):
    with pytest.raises(UsageError) as err:
        load_config(None, overrides)
    message = str(err.value)
    assert fragment in message
    assert "\n" not in message


def test_yaml_errors(tmp_path):
    with pytest.raises(UsageError, match="recipe file not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(UsageError, match="not valid YAML at line [0-9]+; fix the file"):
        load_config(write(tmp_path, "optim:\n  lr: [1,\n"))
    with pytest.raises(UsageError, match="must be a mapping"):
        load_config(write(tmp_path, "- 1\n- 2\n"))
    with pytest.raises(UsageError, match="unknown recipe key 'optim.learning_rate'"):
        load_config(write(tmp_path, "optim:\n  learning_rate: 0.1\n"))
    with pytest.raises(UsageError, match="schedule.plateau.patience: expected an integer"):
        load_config(write(tmp_path, "schedule:\n  plateau:\n    patience: soon\n"))
    with pytest.raises(UsageError, match="unknown recipe key '1'"):
        load_config(write(tmp_path, "1: 2\n"))
    with pytest.raises(UsageError, match="unknown recipe key 'optim.1'"):
        load_config(write(tmp_path, "optim:\n  1: 2\n"))
    assert load_config(write(tmp_path, "optim:\nschedule:\n  plateau: null\n")) == load_config(None, {"name": "r"})


def test_task_options_are_free_form_here():
    cfg = load_config(None, {"task.options.num_train": 256, "task.options.text_file": "x.txt"})
    assert cfg.task.options == {"num_train": 256, "text_file": "x.txt"}


def test_config_is_frozen():
    cfg = load_config(None, {})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.optim.lr = 3  # type: ignore[misc]


def test_resolved_yaml_round_trips(tmp_path):
    cfg = load_config(ROOT / "recipes" / "mnist1d.yaml", {"optim.lr": 0.007, "tracking.wandb.tags": "a,b"})
    again = load_config(write(tmp_path, to_yaml(cfg), "config.yaml"))
    assert again == cfg
    assert yaml.safe_load(to_yaml(cfg))["optim"]["betas"] == [0.9, 0.999]


def test_flatten_and_valid_keys():
    flat = flatten(to_dict(Config()))
    assert flat["optim.lr"] == Config().optim.lr
    assert flat["schedule.plateau.patience"] == 3
    keys = valid_keys()
    assert "schedule.plateau.min_lr" in keys and "tracking.wandb.project" in keys
    # every leaf of the flattened defaults is a valid key
    assert all(k in keys for k in flat if not k.startswith("task.options"))


def _recipes() -> list[Path]:
    return sorted(p for p in (ROOT / "recipes").rglob("*.yaml"))


@pytest.mark.parametrize("recipe", _recipes(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_recipe_loads(recipe):
    cfg = load_config(recipe)
    assert cfg.name == recipe.stem
    assert recipe.read_text().startswith("#"), "each recipe starts with a comment block giving its command"


def test_every_leaf_is_described_and_says_whether_it_affects_training():
    from launcher.config import affects_training

    flat = flatten(to_dict(Config()))
    assert {k for k in flat if not affects_training(k)} >= {"name", "data.root", "train.progress_bar",
                                                            "checkpoint.keep_last", "tracking.wandb.project"}
    assert {k for k in flat if affects_training(k)} >= {"optim.lr", "schedule.plateau.factor", "train.seed",
                                                        "train.batch_size", "task.options"}
    assert affects_training("task.options.n_layer")  # a task's own option answers as task.options
    with pytest.raises(KeyError):
        affects_training("optim.lrr")

    def field(key):
        cls = Config
        *sections, leaf = key.split(".")
        for part in sections:
            cls = cls.__pydantic_fields__[part].annotation
        return cls.__pydantic_fields__[leaf]

    fields = {key: field(key) for key in valid_keys()}
    undescribed = [k for k, f in fields.items() if not (f.description or "").strip()]
    assert undescribed == []
    assert "global batch" in fields["optim.reference_batch_size"].description


def test_compare_grouping_and_training_keys_agree_on_every_key():
    """One source: a key is in `training_keys` exactly when compare keeps runs that differ in it apart,
    except train.seed, which compare groups over (runs differing only by it are seeds of one setup)."""
    from launcher.compare import _matters
    from launcher.config import affects_training, training_keys

    cfg = load_config(None, {"task.options.num_train": 256})
    flat = flatten(to_dict(cfg))
    kept = training_keys(cfg)
    assert set(kept) < set(flat) and kept["optim.betas"] == [0.9, 0.999]
    for key in flat:
        assert _matters(key) == (key in kept and key != "train.seed"), key
    assert "train.seed" in kept and not _matters("train.seed")
    for key in valid_keys():  # sections too
        assert _matters(key) == (affects_training(key) and key != "train.seed"), key


def test_sections_built_in_code_follow_the_same_rules():
    from launcher.config import PlateauConfig, TrainConfig

    assert TrainConfig(batch_size="8", compile="yes") == TrainConfig(batch_size=8, compile=True)
    with pytest.raises(ValueError, match="factor"):
        PlateauConfig(factor=2)
    with pytest.raises(ValueError, match="lrr"):
        Config(optim={"lrr": 1})
