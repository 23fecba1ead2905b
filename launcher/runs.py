"""Reading runs: local run directories, W&B offline logs and W&B runs online, as `Run`s.

A RUN argument is a run directory written by launcher.train (config.yaml, plan.json, metrics.jsonl,
summary.json), a folder of run directories (a sweep or a `compare --train` output), a W&B offline
run (`wandb/offline-run-*` or its `run-*.wandb` file; a `wandb/` folder reads every run in it), or a
W&B path `entity/project/run_id` or `entity/project/group:NAME` (needs network and an API key).
The W&B offline log is read straight from its LevelDB-style record file; no network is needed.
"""

from __future__ import annotations

import contextlib
import json
import re
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from launcher.errors import UsageError

_WANDB_PATH = re.compile(r"^[\w.-]+/[\w.-]+/(group:.+|[\w-]+)$")


@dataclass
class Run:
    """One run's metrics, wherever they came from."""

    name: str
    source: str
    config: dict[str, Any] = field(default_factory=dict)
    """Flat (`optim.lr`), plus `plan.*` where known."""
    rows: list[dict[str, Any]] = field(default_factory=list)
    """metrics.jsonl rows (or W&B history rows), in step order."""
    summary: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Reading runs
# ---------------------------------------------------------------------------------------------


def load_runs(spec: str) -> list[Run]:
    """A RUN argument -> one or more runs (a W&B group, a `wandb/` folder or a sweep can hold several)."""
    path = Path(spec)
    if path.is_file() and path.suffix == ".wandb":
        return [read_wandb_offline([path])]
    if path.is_dir():
        if (path / "metrics.jsonl").is_file():
            return [read_local(path)]
        children = run_dirs_in(path)
        if children and (path / "sweep.json").is_file():  # a sweep (its own W&B summary run aside)
            return [read_local(child) for child in children]
        offline = _offline_runs(path)
        if offline:
            return [read_wandb_offline(files) for files in offline]
        if children:
            return [read_local(child) for child in children]
        raise UsageError(f"run {spec!r} has no metrics.jsonl, no W&B offline run (wandb/offline-run-*) and no run "
                         "directories; pass a run directory written by launcher.train or a sweep/compare directory")
    if not path.exists() and _WANDB_PATH.match(spec) and not looks_local(spec):
        return read_wandb_online(spec)
    if looks_local(spec):
        raise UsageError(f"no such run directory: {spec!r} not found (nearest existing folder: "
                         f"{_existing_part(spec)}); check the path")
    raise UsageError(f"run {spec!r} not found: pass a run directory (with metrics.jsonl), a W&B offline run "
                     "(wandb/offline-run-*), or a W&B path entity/project/run_id")


def _existing_part(spec: str) -> str:
    """The longest leading part of a path that exists (`.` if none)."""
    path = Path(spec)
    for parent in [path, *path.parents]:
        if str(parent) not in ("", ".") and parent.exists():
            return str(parent)
    return "."


def looks_local(spec: str) -> bool:
    """A path meant as a local one: it starts with runs/, ./, ../, / or ~, or some leading part of it exists."""
    if spec.startswith(("runs/", "./", "../", "/", "~")):
        return True
    return _existing_part(spec) != "."


def run_dirs_in(path: Path) -> list[Path]:
    """The run directories directly inside a sweep or compare directory, in the order it lists them."""
    order: list[str] = []
    with contextlib.suppress(OSError, ValueError, AttributeError, KeyError, TypeError):
        order = [str(r["dir"]) for r in json.loads((path / "sweep.json").read_text())["runs"]]
    found = sorted(p for p in path.iterdir() if p.is_dir() and (p / "metrics.jsonl").is_file()
                   and ".incomplete-" not in p.name)  # a run set aside to be started again
    if order:  # a sweep: exactly its own runs, in its order
        rank = {name: i for i, name in enumerate(order)}
        return sorted((p for p in found if p.name in rank), key=lambda p: rank[p.name])
    return found


def completed(run_dir: Path) -> bool:
    """Whether a run directory holds a finished run (summary.json says `completed`)."""
    try:
        return json.loads((Path(run_dir) / "summary.json").read_text()).get("status") == "completed"
    except (OSError, ValueError, AttributeError):
        return False


def _flat(tree: dict) -> dict[str, Any]:
    from launcher.config import flatten

    return flatten(tree)


def read_local(path: Path) -> Run:
    """A run directory written by launcher.train: config.yaml, plan.json, metrics.jsonl, summary.json."""
    import yaml

    config: dict[str, Any] = {}
    if (path / "config.yaml").is_file():
        try:
            config = _flat(yaml.safe_load((path / "config.yaml").read_text()) or {})
        except yaml.YAMLError:
            raise UsageError(f"{path / 'config.yaml'} is not valid YAML; fix or remove it") from None
    if (path / "plan.json").is_file():
        with contextlib.suppress(ValueError):
            config.update({f"plan.{k}": v for k, v in json.loads((path / "plan.json").read_text()).items()})
    rows = []
    with open(path / "metrics.jsonl", encoding="utf-8") as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a torn last line from a killed run
    summary = {}
    if (path / "summary.json").is_file():
        with contextlib.suppress(ValueError):
            summary = json.loads((path / "summary.json").read_text())
    return Run(name=path.resolve().name, source=str(path), config=config, rows=rows, summary=summary)


def _offline_runs(path: Path) -> list[list[Path]]:
    """The `.wandb` files under a run dir, a `wandb/` folder or an `offline-run-*` folder, by run id.

    A resumed run writes one offline folder per start, all with the same id; they are read in order.
    """
    candidates = [path, path / "wandb"]
    files: list[Path] = []
    for folder in candidates:
        if folder.is_dir():
            files += sorted(folder.glob("run-*.wandb")) + sorted(folder.glob("offline-run-*/run-*.wandb"))
    by_id: dict[str, list[Path]] = {}
    for f in files:
        by_id.setdefault(f.stem.removeprefix("run-"), []).append(f)
    return list(by_id.values())


# The `.wandb` file is a LevelDB-style log of protobuf `Record`s: a 7-byte file header, then 32 KiB
# blocks of chunks, each with a header (crc32, length, type); FIRST/MIDDLE/LAST chunks join into one.
_BLOCK = 32768
_HEADER = 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def read_wandb_records(path: Path) -> Iterator[Any]:
    """The protobuf records of a W&B transaction log (`run-*.wandb`), up to the first damaged chunk."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    if len(data) < _HEADER or data[:4] != b":W&B":
        raise UsageError(f"{path} is not a W&B run file (.wandb)")
    pos, parts = _HEADER, None
    while pos + _HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:
            pos += left  # block trailer padding
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + _HEADER])
        if crc == 0 and length == 0 and kind == 0:
            pos += left
            continue
        chunk = data[pos + _HEADER:pos + _HEADER + length]
        if len(chunk) < length or zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF != crc:
            return  # a run still being written, or cut off by a kill
        pos += _HEADER + length
        if kind == _FULL:
            payload = chunk
        elif kind == _FIRST:
            parts = [chunk]
            continue
        elif kind == _MIDDLE and parts is not None:
            parts.append(chunk)
            continue
        elif kind == _LAST and parts is not None:
            payload, parts = b"".join([*parts, chunk]), None
        else:
            return
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        yield record


def _item_key(item: Any) -> str:
    return item.key or ".".join(item.nested_key)


def _json_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def read_wandb_offline(files: list[Path]) -> Run:
    """One W&B run from its offline transaction log(s): config, history rows, summary."""
    config: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}
    name = files[0].stem.removeprefix("run-")
    for path in files:
        segment: list[dict[str, Any]] = []
        for record in read_wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                name = record.run.display_name or record.run.run_id or name
                for item in record.run.config.update:
                    config[_item_key(item)] = _json_value(item.value_json)
            elif kind == "config":
                for item in record.config.update:
                    config[_item_key(item)] = _json_value(item.value_json)
                for item in record.config.remove:
                    config.pop(_item_key(item), None)
            elif kind == "history":
                row = {_item_key(i): _json_value(i.value_json) for i in record.history.item}
                segment.append({k: v for k, v in row.items() if not k.startswith("_")} | (
                    {"step": row["_step"]} if "step" not in row and "_step" in row else {}))
            elif kind == "summary":
                for item in record.summary.update:
                    summary[_item_key(item)] = _json_value(item.value_json)
                for item in record.summary.remove:
                    summary.pop(_item_key(item), None)
        if segment and rows:  # a resumed start redoes the steps after its checkpoint
            first = segment[0].get("step", 0)
            rows = [r for r in rows if r.get("step", 0) < first]
        rows += segment
    config = {k: v for k, v in _flat(config).items() if not k.startswith("_")}
    return Run(name=name, source=str(files[0].parent), config=config, rows=rows, summary=summary)


def read_wandb_online(spec: str) -> list[Run]:
    """`entity/project/run_id` or `entity/project/group:NAME` through the W&B public API."""
    from launcher.sinks import have_wandb_credentials

    if not have_wandb_credentials():
        raise UsageError(f"reading the W&B run {spec!r} needs an API key: set WANDB_API_KEY or run `wandb login` "
                         "(or compare local run directories / offline runs instead)")
    entity, project, rest = spec.split("/", 2)
    try:
        import wandb

        api = wandb.Api(timeout=30)
        if rest.startswith("group:"):
            found = list(api.runs(f"{entity}/{project}", filters={"group": rest.removeprefix("group:")},
                                  order="+created_at"))
            if not found:
                raise UsageError(f"W&B group {spec!r} has no runs; check the entity, project and group name")
        else:
            found = [api.run(spec)]
        runs = []
        for r in found:
            rows = [{k: v for k, v in row.items() if not k.startswith("_")}
                    | ({"step": row["_step"]} if "step" not in row and "_step" in row else {})
                    for row in r.scan_history()]
            rows.sort(key=lambda row: row.get("step", 0))
            config = {k: v for k, v in _flat(dict(r.config)).items() if not k.startswith("_")}
            runs.append(Run(name=r.name or r.id, source=f"{entity}/{project}/{r.id}", config=config, rows=rows,
                            summary=dict(r.summary)))
        return runs
    except UsageError:
        raise
    except Exception as err:
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise UsageError(f"could not read the W&B run {spec!r} ({first_line}); check the path, the network and "
                         "WANDB_API_KEY, or compare local run directories / offline runs instead") from None
