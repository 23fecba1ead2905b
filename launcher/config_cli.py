"""How recipe values from YAML and the command line become config values, and how mistakes read.

- `convert`: the coercion rules of the config layer (`'true'` -> True, `'0.005'` -> 0.005,
  `'a,b'` -> ['a', 'b'], `30.0` -> 30 for an integer, a YAML number -> str for a string key). The
  config models apply it to every field before validating it.
- `section` and `setting`: how a config section is declared (a frozen pydantic dataclass that
  refuses unknown keys; a field with its bounds and whether it affects training).
- `format_error`: turns a pydantic `ValidationError` into one `UsageError` line naming the dotted
  key (`optim.lr: must be a positive number; got -1.0`), with the closest valid key for an unknown one.
- `read_recipe`: the recipe YAML, refusing a key given twice in one mapping; `set_dotted`,
  `to_dict`, `flatten`: the plain trees around it.

Nothing here touches torch.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from pydantic import ConfigDict, Field, ValidationError, ValidationInfo, field_validator
from pydantic.dataclasses import dataclass
from pydantic_core import PydanticCustomError

from launcher.errors import UsageError


class BadValue(ValueError):
    """A value that cannot be converted; `at` is the position inside the value (`[1]`), if any."""

    def __init__(self, message: str, at: str = ""):
        super().__init__(message)
        self.at = at


def problem(message: str, at: str = "") -> PydanticCustomError:
    """An error raised inside a validator; `at` is appended to pydantic's location (`.field`, `[0]`)."""
    return PydanticCustomError("launcher", "{message}", {"message": message, "at": at})


def is_section(tp: Any) -> bool:
    return isinstance(tp, type) and hasattr(tp, "__pydantic_fields__")


def convert(value: Any, tp: Any) -> Any:
    """Convert a YAML or CLI value to the type `tp`, or raise BadValue."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        return convert(value, next(a for a in args if a is not type(None)))
    if tp is Any:
        return value
    if origin is typing.Literal:
        if isinstance(value, bool) and all(isinstance(a, str) for a in args):
            meant = next((a for a in (("on", "yes") if value else ("off", "no")) if a in args), "no")
            raise BadValue(f"must be one of {', '.join(args)}; got {value} (YAML reads an unquoted no, yes, off "
                           f"or on as true/false: quote it, e.g. '{meant}')")
        return convert(value, type(args[0]))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "yes", "on", "1"):
            return True
        if isinstance(value, str) and value.strip().lower() in ("false", "no", "off", "0"):
            return False
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise BadValue(f"expected true or false; got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                as_float = float(value.replace("_", ""))
            except ValueError:
                as_float = math.nan
            if math.isfinite(as_float) and as_float.is_integer():
                return int(as_float)
        raise BadValue(f"expected an integer; got {value!r}")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise BadValue(f"expected a number; got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, bool | int | float):
            return str(value)
        raise BadValue(f"expected a string; got {value!r}")
    if origin in (list, tuple):
        return _convert_sequence(value, origin, args)
    if origin is dict:
        if not isinstance(value, dict):
            raise BadValue(f"expected a mapping; got {value!r}")
        return dict(value)
    if is_section(tp):
        if value is None:
            return {}
        if isinstance(value, dict | tp):
            return value
        raise BadValue(f"expected a mapping of keys; got {value!r}")
    raise AssertionError(f"unsupported config type {tp!r}")


def _convert_sequence(value: Any, origin: type, args: tuple) -> Any:
    fixed = origin is tuple and args and args[-1] is not Ellipsis
    if isinstance(value, str):
        value = [v for v in value.replace(",", " ").split() if v]
    if not isinstance(value, list | tuple):
        if fixed:
            raise BadValue(f"expected {len(args)} values separated by commas; got {value!r}")
        raise BadValue(f"expected a list; got {value!r}")
    if fixed and len(value) != len(args):
        raise BadValue(f"expected {len(args)} values; got {list(value)!r}")
    types_ = args if fixed else [args[0] if args else Any] * len(value)
    items = []
    for i, (v, a) in enumerate(zip(value, types_)):
        try:
            items.append(convert(v, a))
        except BadValue as err:
            raise BadValue(str(err), f"[{i}]{err.at}") from None
    return tuple(items) if origin is tuple else items


def coerce(value: Any, tp: Any, key: str) -> Any:
    """`convert`, with a UsageError naming `key` (e.g. `task.options.n_layer`) on failure."""
    try:
        return convert(value, tp)
    except BadValue as err:
        raise UsageError(f"{key}{err.at}: {err}") from None


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------

_MODEL = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_default=False)


def setting(default: Any = dataclasses.MISSING, *, training: bool = True, note: str = "", message: str = "",
            factory: Any = None, **constraints: Any) -> Any:
    """A field: its default, constraints (ge/gt/le/lt/min_length/allow_inf_nan) and metadata.

    `training=False`: the value never changes what a run learns (paths, logging, speed knobs).
    `note` is added to a bound's message (`must be >= 0 (0 = off)`); `message` replaces it.
    """
    extra: dict[str, Any] = {"affects_training": training}
    if note:
        extra["note"] = note
    if message:
        extra["message"] = message
    if factory is not None:
        return Field(default_factory=factory, json_schema_extra=extra, **constraints)
    return Field(default, json_schema_extra=extra, **constraints)


class Section:
    """Base of every section: converts YAML and CLI values with `config_cli.convert` before validation."""

    @field_validator("*", mode="before", check_fields=False)
    @classmethod
    def _convert(cls, value: Any, info: ValidationInfo) -> Any:
        try:
            return convert(value, cls.__pydantic_fields__[info.field_name].annotation)
        except BadValue as err:
            raise problem(str(err), err.at) from None


def section(cls: type) -> type:
    """A frozen pydantic dataclass refusing unknown keys, documented by its attribute docstrings."""
    return dataclass(frozen=True, config=_MODEL)(cls)


# ---------------------------------------------------------------------------------------------
# Keys and errors
# ---------------------------------------------------------------------------------------------


def field_at(root: type, loc: tuple) -> Any:
    """The pydantic FieldInfo at a location such as ('schedule', 'plateau', 'factor'), or None."""
    cls, info = root, None
    for part in loc:
        fields = getattr(cls, "__pydantic_fields__", None)
        if not fields or part not in fields:
            return None
        info = fields[part]
        cls = info.annotation
    return info


def closest_key(key: str, keys: list[str]) -> str | None:
    """The valid dotted key most like `key` (a typo, or a leaf name given without its section)."""
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    if close:
        return close[0]
    leaf = key.rsplit(".", 1)[-1]
    by_leaf = [k for k in keys if k.rsplit(".", 1)[-1] == leaf]
    if len(by_leaf) == 1:
        return by_leaf[0]
    close = difflib.get_close_matches(leaf, [k.rsplit(".", 1)[-1] for k in keys], n=1, cutoff=0.75)
    matches = [k for k in keys if close and k.rsplit(".", 1)[-1] == close[0]]
    return matches[0] if len(matches) == 1 else None


def unknown_key(key: str, keys: list[str]) -> UsageError:
    close = closest_key(key, keys)
    hint = f"; did you mean {close}?" if close else "; see `python -m launcher.train --print_config` for all keys"
    return UsageError(f"unknown recipe key {key!r}{hint}")


_BOUNDS = {"gt": ("(", ">"), "ge": ("[", ">="), "lt": (")", "<"), "le": ("]", "<=")}
BOUND_ERRORS = ("greater_than", "greater_than_equal", "less_than", "less_than_equal", "finite_number",
                 "string_too_short", "literal_error")


def expected(info: Any) -> str:
    """What a field accepts, in words: `must be in (0, 1)`, `must be >= 1 (0 = off)`, `must be one of ...`."""
    extra = info.json_schema_extra or {}
    if "message" in extra:
        return extra["message"]
    if typing.get_origin(info.annotation) is typing.Literal:
        return "must be one of " + ", ".join(str(a) for a in typing.get_args(info.annotation))
    bounds = {name: getattr(m, name) for m in info.metadata for name in _BOUNDS if hasattr(m, name)}
    lower = next(((n, v) for n, v in bounds.items() if n in ("gt", "ge")), None)
    upper = next(((n, v) for n, v in bounds.items() if n in ("lt", "le")), None)
    if lower and upper:
        text = f"must be in {_BOUNDS[lower[0]][0]}{lower[1]}, {upper[1]}{_BOUNDS[upper[0]][0]}"
    elif lower or upper:
        name, bound = lower or upper
        text = f"must be {_BOUNDS[name][1]} {bound}"
    else:
        text = "must be a finite number"
    return f"{text} ({extra['note']})" if "note" in extra else text


def format_error(err: ValidationError, root: type, keys: list[str]) -> UsageError:
    """The first problem in `err` as one line naming its dotted key."""
    e = err.errors()[0]
    loc = ".".join(str(p) for p in e["loc"])
    if e["type"] in ("unexpected_keyword_argument", "extra_forbidden", "invalid_key"):
        return unknown_key(loc, keys)
    return value_problem(e, root, loc, "recipe")


def value_problem(e: dict[str, Any], root: type, key: str, whole: str) -> UsageError:
    """A pydantic error about a value as one line naming `key` (`whole` when it has no location): a
    validator's own words, the field's range, else pydantic's message (recipe and task options alike)."""
    if e["type"] == "launcher":
        at = e["ctx"]["at"]
        where = f"{key}{at}" if key else at.lstrip(".")
        return UsageError(f"{where}: {e['ctx']['message']}")
    cause = (e.get("ctx") or {}).get("error")
    if isinstance(cause, UsageError):  # raised as is by a validator
        return cause
    if isinstance(cause, Exception):  # a plain ValueError or assert in a validator: its own words
        return UsageError(f"{key or whole}: {cause}")
    info = field_at(root, e["loc"])
    if e["type"] in BOUND_ERRORS and info is not None:
        return UsageError(f"{key}: {expected(info)}; got {e['input']!r}")
    message = e["msg"][:1].lower() + e["msg"][1:]
    return UsageError(f"{key or whole}: {message}" + (f"; got {e['input']!r}" if e["loc"] else ""))


def set_dotted(tree: dict, key: str, value: Any, keys: list[str]) -> None:
    """tree['a']['b'] = value for key `a.b`, creating sections; UsageError for a key that cannot be set."""
    parts = key.split(".")
    if any(not p for p in parts):
        raise UsageError(f"malformed override key {key!r}; use --section.field=value, e.g. --optim.lr=0.005")
    node = tree
    for i, part in enumerate(parts[:-1]):
        sub = node.get(part)
        if sub is None:
            sub = node[part] = {}
        if not isinstance(sub, dict):
            raise unknown_key(key, keys) if ".".join(parts[: i + 1]) not in keys else \
                UsageError(f"{'.'.join(parts[: i + 1])} is a value, not a section; cannot set {key}")
        node = sub
    node[parts[-1]] = value


def to_dict(cfg: Any) -> dict:
    """The config as plain Python types (tuples become lists), re-loadable by `load_config`."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, list | tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(cfg)


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{'optim': {'lr': 1}} -> {'optim.lr': 1} (for trackers and comparisons)."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def validate(build: Callable[[], Any], root: type, keys: list[str]) -> Any:
    """Run `build` (which validates a tree), turning a ValidationError into a one-line UsageError."""
    try:
        return build()
    except ValidationError as err:
        raise format_error(err, root, keys) from None


# ---------------------------------------------------------------------------------------------
# Recipe files
# ---------------------------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (YAML keeps the last silently)."""


class _DuplicateKey(Exception):
    def __init__(self, key: Any, line: int, first: int):
        super().__init__(key)
        self.key, self.line, self.first = key, line, first


def _strict_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue  # `<<: *anchor` may legitimately be overridden by explicit keys
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        try:
            first = seen.get(key)
        except TypeError:  # an unhashable key: let the constructor report it
            break
        if first is not None:
            raise _DuplicateKey(key, line, first)
        seen[key] = line
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _strict_mapping)

_KINDS = {yaml.SequenceNode: "a list", yaml.ScalarNode: "a single value"}
_EMPTY = "is empty (line 1); a recipe needs at least a task: or optim: section (see recipes/mnist1d.yaml)"


def read_recipe(path: str | Path) -> dict:
    """Read a recipe YAML into a plain dict.

    UsageError (naming the file and, where there is one, the line) if the file is missing or
    unreadable, is not valid YAML, is empty, has a top level that is not a mapping, or gives a key
    twice in one mapping.
    """
    p = Path(path)
    name = str(path)
    if p.is_dir():
        raise UsageError(f"recipe {name!r} is a directory; pass --recipe path/to/recipe.yaml (see recipes/)")
    if not p.is_file():
        near = [c for c in (f"{name}.yaml", f"{name}.yml", os.path.join("recipes", name),
                            os.path.join("recipes", f"{name}.yaml")) if os.path.isfile(c)]
        hint = f"did you mean --recipe {near[0]}?" if near else "pass --recipe path/to/recipe.yaml (see recipes/)"
        raise UsageError(f"recipe file not found: {name!r}; {hint}")
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else "not UTF-8 text"
        raise UsageError(f"recipe {name!r} cannot be read ({reason}); pass a readable recipe YAML") from None
    loader = _StrictLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            raise UsageError(f"recipe {name!r} {_EMPTY}")
        if not isinstance(node, yaml.MappingNode):
            raise UsageError(f"recipe {name!r} line {node.start_mark.line + 1}: the top level must be a mapping of "
                             f"sections (task:, optim:, ...); got {_KINDS.get(type(node), 'something else')}")
        raw = loader.construct_document(node)
    except _DuplicateKey as dup:
        raise UsageError(f"recipe {name!r} line {dup.line}: key {dup.key!r} is given twice in the same "
                         f"section (first at line {dup.first}); keep one of them") from None
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        raise UsageError(f"recipe {name!r} is not valid YAML{line}; fix the file") from None
    finally:
        loader.dispose()
    if not raw:
        raise UsageError(f"recipe {name!r} {_EMPTY}")
    return raw
