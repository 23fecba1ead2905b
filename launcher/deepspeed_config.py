"""DeepSpeed configs: resolve "auto" from the recipe, validate with DeepSpeed's own parser, build the plugin.

Accelerate fills a `gradient_clipping: "auto"` with 1.0 whatever the recipe says and does not
validate the JSON; here every value the recipe owns is filled in (or checked against the recipe)
and the result is validated, so Accelerate gets a plugin with no "auto" left in the fields we own.
"""

from __future__ import annotations

import copy
import json
import os
from typing import TYPE_CHECKING, Any

from launcher.errors import UsageError

if TYPE_CHECKING:
    from launcher.config import TrainConfig

_PYDANTIC_SECTIONS = {
    "DeepSpeedZeroConfig": "zero_optimization", "DeepSpeedZeroOffloadParamConfig": "zero_optimization.offload_param",
    "DeepSpeedZeroOffloadOptimizerConfig": "zero_optimization.offload_optimizer",
    "DeepSpeedFP16Config": "fp16", "DeepSpeedBF16Config": "bf16", "DeepSpeedActivationCheckpointingConfig":
    "activation_checkpointing", "DeepSpeedFlopsProfilerConfig": "flops_profiler", "DeepSpeedMonitorConfig": "monitor",
}


def _one_line(err: Exception) -> str:
    errors = getattr(err, "errors", None)
    if callable(errors):  # pydantic.ValidationError
        section = _PYDANTIC_SECTIONS.get(getattr(err, "title", ""), getattr(err, "title", ""))
        parts = []
        for e in errors():
            key = ".".join([section, *(str(x) for x in e.get("loc", ()))]).strip(".")
            parts.append(f"{key}: {e.get('msg')} (got {e.get('input')!r})")
        return "; ".join(parts)
    return " ".join(str(err).split()) or type(err).__name__


def _autos(tree: Any, prefix: str = "") -> list[str]:
    if isinstance(tree, dict):
        return [k for key, v in tree.items() for k in _autos(v, f"{prefix}{key}.")]
    return [prefix.rstrip(".")] if tree == "auto" else []


def resolve_deepspeed_config(raw: dict, source: str, *, micro_batch: int, grad_accum: int, world_size: int,
                             clip_grad_norm: float, mixed_precision: str) -> dict:
    """A copy of the DeepSpeed config with every value the recipe owns filled in and checked.

    `"auto"` (or a missing key) takes the recipe's value; an explicit value that disagrees with the
    recipe is a UsageError naming `source`, the key and the fix. The result is validated with
    `deepspeed.runtime.config.DeepSpeedConfig`.
    """
    if not isinstance(raw, dict):
        raise UsageError(f"{source}: a DeepSpeed config must be a JSON object")
    cfg = copy.deepcopy(raw)
    if "zero_optimization" not in cfg:
        raise UsageError(f"{source}: no \"zero_optimization\" section; add one, e.g. \"zero_optimization\": {{\"stage\": 2}}")
    for section in ("optimizer", "scheduler"):
        if section in cfg:
            raise UsageError(f"{source}: remove the \"{section}\" section; the launcher builds the optimizer and "
                             "LR schedule from the recipe (optim.*, schedule.*)")
    owned = {
        "train_micro_batch_size_per_gpu": (micro_batch, "train.batch_size"),
        "gradient_accumulation_steps": (grad_accum, "train.grad_accum_steps"),
        "train_batch_size": (micro_batch * grad_accum * world_size,
                             f"train.batch_size x {world_size} processes x train.grad_accum_steps"),
        "gradient_clipping": (float(clip_grad_norm), "optim.clip_grad_norm (0 = off)"),
    }
    for key, (value, origin) in owned.items():
        given = cfg.get(key, "auto")
        if given == "auto":
            cfg[key] = value
        elif not isinstance(given, int | float) or isinstance(given, bool) or float(given) != float(value):
            raise UsageError(f"{source}: {key} is {given!r} but the recipe gives {value} ({origin}); "
                             f"set it to \"auto\" in the file or change the recipe")
    for dtype in ("fp16", "bf16"):
        section = cfg.setdefault(dtype, {})
        if not isinstance(section, dict):
            raise UsageError(f"{source}: \"{dtype}\" must be an object such as {{\"enabled\": \"auto\"}}")
        wanted = mixed_precision == dtype
        given = section.get("enabled", "auto" if wanted else False)
        if given == "auto" or given is wanted:
            section["enabled"] = wanted
        else:
            raise UsageError(f"{source}: {dtype}.enabled is {json.dumps(given)} but train.mixed_precision resolves to "
                             f"{mixed_precision!r}; set {dtype}.enabled to \"auto\" or pass "
                             f"--train.mixed_precision={dtype if given is True else 'no'}")
    left = _autos(cfg)
    if left:
        raise UsageError(f"{source}: {', '.join(left)} is \"auto\" but only batch sizes, gradient_accumulation_steps, "
                         "gradient_clipping and fp16/bf16.enabled are filled in from the recipe; give it a value")
    _validate_deepspeed(cfg, source, world_size)
    return cfg


def _validate_deepspeed(cfg: dict, source: str, world_size: int) -> None:
    try:
        from deepspeed.runtime.config import DeepSpeedConfig
    except ImportError:
        raise UsageError(f"{source}: DeepSpeed is not installed; pip install 'launcher[deepspeed]'") from None
    # DeepSpeedConfig sees a world of 1 before the process group exists: check one rank's share.
    check = dict(cfg, train_batch_size=cfg["train_batch_size"] // world_size)
    try:
        DeepSpeedConfig(check)
    except Exception as err:  # DeepSpeed reports with pydantic, assert, ValueError and TypeError alike
        raise UsageError(f"{source}: invalid DeepSpeed config: {_one_line(err)}") from None


def deepspeed_config_source() -> tuple[dict | None, str]:
    """The DeepSpeed JSON named by `accelerate launch` (None: the accelerate config's own fields)."""
    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    if path in ("", "none"):
        return None, "the deepspeed_config fields of the accelerate config"
    if not os.path.isfile(path):
        raise UsageError(f"DeepSpeed config {path!r} not found (deepspeed_config_file in the accelerate config); "
                         "give a path relative to the directory you launch from")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f), path
    except json.JSONDecodeError as err:
        raise UsageError(f"DeepSpeed config {path!r} is not valid JSON at line {err.lineno}: {err.msg}; fix the file") from None


_DS_FIELDS_OWNED_BY_JSON = ("gradient_accumulation_steps", "gradient_clipping", "zero_stage", "offload_optimizer_device",
                            "offload_param_device", "offload_param_nvme_path", "offload_optimizer_nvme_path",
                            "zero3_save_16bit_model", "mixed_precision")


def make_deepspeed_plugin(train: TrainConfig, clip_grad_norm: float, world_size: int, mixed_precision: str):
    from accelerate.utils import DeepSpeedPlugin

    raw, source = deepspeed_config_source()
    if raw is not None:
        # Accelerate refuses these next to deepspeed_config_file, in a multi-line ValueError.
        clash = [f for f in os.environ.get("ACCELERATE_CONFIG_DS_FIELDS", "").split(",") if f in _DS_FIELDS_OWNED_BY_JSON]
        if clash:
            raise UsageError(
                f"the accelerate config sets {', '.join(clash)} next to deepspeed_config_file {source!r}; remove "
                f"{'them' if len(clash) > 1 else 'it'} from the accelerate config (precision: pass --mixed_precision "
                "to accelerate launch or set train.mixed_precision; the rest belongs in the JSON)")
    if raw is None:  # accelerate builds a config from zero_stage / offload fields; resolve that one
        raw = DeepSpeedPlugin(gradient_accumulation_steps=train.grad_accum_steps).deepspeed_config
        raw.pop("steps_per_print", None)
    resolved = resolve_deepspeed_config(
        raw, source, micro_batch=train.batch_size, grad_accum=train.grad_accum_steps, world_size=world_size,
        clip_grad_norm=clip_grad_norm, mixed_precision=mixed_precision)
    # The accelerate config's own DeepSpeed fields are already in `resolved`; Accelerate would refuse
    # them next to a config dict, so hide their names while the plugin checks.
    fields = os.environ.pop("ACCELERATE_CONFIG_DS_FIELDS", None)
    try:
        return DeepSpeedPlugin(hf_ds_config=resolved, gradient_accumulation_steps=train.grad_accum_steps,
                               gradient_clipping=float(clip_grad_norm))
    finally:
        if fields is not None:
            os.environ["ACCELERATE_CONFIG_DS_FIELDS"] = fields

