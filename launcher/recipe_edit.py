"""Writing a recipe with some values changed, keeping its comments (round-trip YAML).

Used by `find_lr --apply` and `sweep --apply`: the output is a new file, never an overwrite.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from launcher.errors import UsageError
from launcher.output import check_file


def _pyyaml_float(representer: Any, value: float) -> Any:
    """A float written so that PyYAML (YAML 1.1, the recipe loader) reads it back as a float: 1.0e-05,
    not ruamel's 1e-05, which YAML 1.1 reads as a string."""
    text = yaml.safe_dump(value).strip().removesuffix("...").strip()
    return representer.represent_scalar("tag:yaml.org,2002:float", text)


def _plain(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _set_in_tree(tree: dict, dotted_key: str, value: Any) -> None:
    *sections, leaf = dotted_key.split(".")
    node = tree
    for name in sections:
        node = node.setdefault(name, {})
    node[leaf] = value


def recipe_with(recipe_path: str, values: dict[str, Any]) -> tuple[str, bool]:
    """The recipe's text with each dotted key set; (text, comments_kept).

    A round-trip YAML edit (ruamel.yaml): comments, key order, flow style and quoting of everything
    else are kept; a missing key is added at the end of its section (sections are created). The
    result must load to exactly the intended recipe, else the intended recipe is dumped as plain
    YAML (comments lost).
    """
    import io

    from ruamel.yaml import YAML
    from ruamel.yaml.comments import CommentedMap

    from launcher.config import read_recipe

    original = Path(recipe_path).read_text()
    intended = read_recipe(recipe_path)
    for key, value in values.items():
        _set_in_tree(intended, key, _plain(value))
    try:
        rt = YAML()
        rt.preserve_quotes = True
        rt.width = 4096
        rt.indent(mapping=2, sequence=4, offset=2)
        rt.representer.add_representer(float, _pyyaml_float)
        doc = rt.load(original)
        for key, value in values.items():
            *sections, leaf = key.split(".")
            node = doc
            for name in sections:
                if not isinstance(node.get(name), dict):
                    node[name] = CommentedMap()
                node = node[name]
            node[leaf] = _plain(value)
        stream = io.StringIO()
        rt.dump(doc, stream)
        text = stream.getvalue()
        if yaml.safe_load(text) == intended:
            return text, True
    except Exception:  # any layout ruamel cannot round-trip: fall back to a plain dump below
        pass
    return yaml.safe_dump(intended, sort_keys=False, default_flow_style=None), False


# ---------------------------------------------------------------------------------------------
# The run.
# ---------------------------------------------------------------------------------------------


def check_apply(path: str) -> str | None:
    if os.path.exists(path):
        return f"--apply {path!r} already exists; choose a new file name (nothing is overwritten)"
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.exists(parent):
        return f"--apply {path!r}: directory {parent!r} does not exist; create it or choose another path"
    try:
        check_file(path, "--apply")
    except UsageError as err:
        return str(err)
    return None


def write_recipe(recipe: str, path: str, overrides: dict[str, Any], lr: float) -> None:
    problem = check_apply(path)
    if problem:
        raise UsageError(problem)
    values = {k.lstrip("-").replace("-", "_") if k.startswith("-") else k: v for k, v in overrides.items()}
    values["optim.lr"] = lr
    text, kept = recipe_with(recipe, values)
    with open(path, "x") as f:  # "x": never overwrite, even if the file appeared meanwhile
        f.write(text)
    extra = f" and the overrides {', '.join(k for k in values if k != 'optim.lr')}" if len(values) > 1 else ""
    note = "" if kept else " (written as plain YAML: the recipe's comments could not be kept)"
    print(f"wrote {path}: {recipe} with optim.lr={lr:g}{extra}{note}", flush=True)
