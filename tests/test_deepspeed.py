"""DeepSpeed through Accelerate: configs resolved from the recipe, validated up front, and a real
2-process ZeRO-2 run on CPU (gloo) that trains exactly like one process.

The real run uses accumulation (DeepSpeed's engine owns it) and a small clip norm (DeepSpeed clips
inside its engine, from `gradient_clipping` in its config; Accelerate alone would put 1.0 there), so
matching the one-process losses step by step checks both. The first DeepSpeed start on a machine
compiles an op (~30 s to minutes; cached in ~/.cache/torch_extensions).
"""

from __future__ import annotations

import json
import os

import pytest

from launcher.deepspeed_config import resolve_deepspeed_config
from launcher.errors import UsageError

from helpers import ACCELERATE, EXITS_ENV, ROOT, assert_usage_exits, read_metrics, recording_exits, run, train

pytest.importorskip("deepspeed")
pytest.importorskip("transformers")  # accelerate's DeepSpeed path reads its version

ZERO2 = json.loads((ROOT / "accelerate_configs/deepspeed/zero2.json").read_text())
ZERO3 = json.loads((ROOT / "accelerate_configs/deepspeed/zero3.json").read_text())
RECIPE = dict(micro_batch=16, grad_accum=2, world_size=4, clip_grad_norm=0.5, mixed_precision="no")


# ---------------------------------------------------------------------------------------------
# Resolving and validating the JSON (no processes)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("raw", [ZERO2, ZERO3], ids=["zero2", "zero3"])
def test_shipped_configs_resolve_every_auto_from_the_recipe(raw):
    cfg = resolve_deepspeed_config(raw, "x.json", **RECIPE)
    assert cfg["train_micro_batch_size_per_gpu"] == 16
    assert cfg["gradient_accumulation_steps"] == 2
    assert cfg["train_batch_size"] == 16 * 2 * 4
    assert cfg["gradient_clipping"] == 0.5
    assert cfg["bf16"]["enabled"] is False and cfg["fp16"]["enabled"] is False
    assert "auto" not in json.dumps(cfg)
    assert raw["gradient_clipping"] == "auto"  # the input is not modified


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_auto_precision_follows_the_resolved_mixed_precision(precision):
    cfg = resolve_deepspeed_config(ZERO2, "x.json", **{**RECIPE, "mixed_precision": precision})
    assert cfg[precision]["enabled"] is True
    assert cfg["fp16" if precision == "bf16" else "bf16"]["enabled"] is False


def test_clipping_off_in_the_recipe_is_zero_for_deepspeed():
    assert resolve_deepspeed_config(ZERO2, "x.json", **{**RECIPE, "clip_grad_norm": 0.0})["gradient_clipping"] == 0.0


@pytest.mark.parametrize(("change", "expected"), [
    ({"gradient_clipping": 1.0}, "gradient_clipping is 1.0 but the recipe gives 0.5 (optim.clip_grad_norm"),
    ({"train_micro_batch_size_per_gpu": 8}, "train_micro_batch_size_per_gpu is 8 but the recipe gives 16 (train.batch_size)"),
    ({"gradient_accumulation_steps": 4}, "gradient_accumulation_steps is 4 but the recipe gives 2"),
    ({"train_batch_size": 64}, "train_batch_size is 64 but the recipe gives 128"),
    ({"optimizer": {"type": "AdamW", "params": {"lr": "auto"}}}, "remove the \"optimizer\" section"),
    ({"scheduler": {"type": "WarmupLR"}}, "remove the \"scheduler\" section"),
    ({"bf16": {"enabled": True}}, "bf16.enabled is true but train.mixed_precision resolves to 'no'"),
    ({"zero_optimization": {"stage": 7}}, "zero_optimization.stage: Input should be 0, 1, 2, 3"),
    ({"zero_optimization": {"stage": 2, "reduce_bucket_sise": 5}}, "zero_optimization.reduce_bucket_sise: Extra inputs"),
    ({"zero_optimization": {"stage": 3, "stage3_prefetch_bucket_size": "auto"}},
     "zero_optimization.stage3_prefetch_bucket_size is \"auto\""),
])
def test_mistakes_are_one_line_usage_errors_naming_the_file_and_key(change, expected):
    with pytest.raises(UsageError) as err:
        resolve_deepspeed_config({**ZERO2, **change}, "my_ds.json", **RECIPE)
    message = str(err.value)
    assert message.startswith("my_ds.json: ") and expected in message, message
    assert "\n" not in message


def test_missing_zero_section_is_named():
    raw = {k: v for k, v in ZERO2.items() if k != "zero_optimization"}
    with pytest.raises(UsageError, match="no \"zero_optimization\" section"):
        resolve_deepspeed_config(raw, "x.json", **RECIPE)


def test_accelerate_config_without_a_json_is_resolved_too(monkeypatch):
    """`accelerate config` can describe ZeRO with fields instead of a JSON file; those are honoured."""
    from launcher.config import TrainConfig
    from launcher.deepspeed_config import make_deepspeed_plugin

    for key, value in {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3",
                       "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "2", "ACCELERATE_DEEPSPEED_CONFIG_FILE": "none",
                       "ACCELERATE_CONFIG_DS_FIELDS": "zero_stage,gradient_accumulation_steps"}.items():
        monkeypatch.setenv(key, value)
    plugin = make_deepspeed_plugin(TrainConfig(batch_size=8, grad_accum_steps=2), 0.5, 2, "bf16")
    ds = plugin.deepspeed_config
    assert (plugin.zero_stage, ds["zero_optimization"]["stage"]) == (3, 3)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (8, 2, 32)
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    assert os.environ["ACCELERATE_CONFIG_DS_FIELDS"] == "zero_stage,gradient_accumulation_steps"


# ---------------------------------------------------------------------------------------------
# Real launches
# ---------------------------------------------------------------------------------------------


def test_bad_config_fails_before_training_with_one_line_and_exit_2(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**ZERO2, "zero_optimization": {"stage": 7}}))
    run_dir = tmp_path / "run"
    proc = train("--recipe", "recipes/mnist1d.yaml", "--output_dir", str(run_dir), timeout=120,
                 ACCELERATE_USE_DEEPSPEED="true", ACCELERATE_DEEPSPEED_CONFIG_FILE=str(bad))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: {bad}: invalid DeepSpeed config: zero_optimization.stage: Input should be 0, 1, 2, 3 or 3 (got 7)"]
    assert not run_dir.exists()


def test_unparseable_json_names_the_line(tmp_path):
    bad = tmp_path / "broken.json"
    bad.write_text('{\n  "zero_optimization": {"stage": 2},\n  "bf16": {"enabled": "auto"}\n  "fp16": {}\n}\n')
    proc = train("--recipe", "recipes/mnist1d.yaml", "--output_dir", str(tmp_path / "r"), timeout=120,
                 ACCELERATE_USE_DEEPSPEED="true", ACCELERATE_DEEPSPEED_CONFIG_FILE=str(bad))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: DeepSpeed config {str(bad)!r} is not valid JSON at line 4: "
                                                "Expecting ',' delimiter; fix the file"]


@pytest.mark.slow
def test_accelerate_config_with_mixed_precision_next_to_the_json_is_refused_through_the_launcher(tmp_path):
    config = tmp_path / "ds.yaml"
    config.write_text((ROOT / "accelerate_configs/cpu_deepspeed_zero2.yaml").read_text() + "mixed_precision: bf16\n")
    run_dir = tmp_path / "run"
    proc = run([*ACCELERATE, "--config_file", str(config), *recording_exits("launcher.train"),
                "--recipe", "recipes/mnist1d.yaml", "--output_dir", str(run_dir)], timeout=300,
               **{EXITS_ENV: str(tmp_path / "exits")})
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert errors == ["error: the accelerate config sets mixed_precision next to deepspeed_config_file "
                      "'accelerate_configs/deepspeed/zero2.json'; remove it from the accelerate config (precision: "
                      "pass --mixed_precision to accelerate launch or set train.mixed_precision; the rest belongs "
                      "in the JSON)"]
    assert_usage_exits(tmp_path / "exits")  # the training processes stopped with the usage status
    assert not run_dir.exists()


@pytest.mark.slow
def test_zero2_two_cpu_processes_train_like_one_process(tmp_path):
    common = ["--recipe", "recipes/mnist1d.yaml", "--task.options.num_train=640", "--task.options.num_test=200",
              "--train.num_epochs=2", "--checkpoint.enabled=false", "--optim.clip_grad_norm=0.05"]
    ds = run([*ACCELERATE, "--config_file", "accelerate_configs/cpu_deepspeed_zero2.yaml",
              "-m", "launcher.train", *common, "--output_dir", str(tmp_path / "ds"), "--train.batch_size=8",
              "--train.grad_accum_steps=2"], timeout=900)
    assert ds.returncode == 0, ds.stdout[-2000:] + ds.stderr[-4000:]
    assert "topology: DEEPSPEED, 2 process(es) on 1 machine(s), device cpu, mixed precision no" in ds.stdout
    assert "deepspeed: ZeRO stage 2, micro-batch 8, accumulation 2, gradient_clipping 0.05" in ds.stdout
    assert ds.stdout.count("completed:") == 1  # one main process, not two that each believe they are alone

    one = train(*common, "--output_dir", str(tmp_path / "one"), "--train.batch_size=32", timeout=300)
    assert one.returncode == 0, one.stderr[-4000:]

    (ds_rows, _), (one_rows, _) = read_metrics(tmp_path / "ds"), read_metrics(tmp_path / "one")
    assert [r["step"] for r in ds_rows] == [r["step"] for r in one_rows] == list(range(1, 41))
    assert [r["lr"] for r in ds_rows] == pytest.approx([r["lr"] for r in one_rows], rel=1e-12)
    assert [r["train/loss"] for r in ds_rows] == pytest.approx([r["train/loss"] for r in one_rows], rel=1e-5)
    # DeepSpeed reports the pre-clip global norm; it must be the one-process norm, and above the clip.
    assert [r["train/grad_norm"] for r in ds_rows] == pytest.approx([r["train/grad_norm"] for r in one_rows], rel=1e-4)
    assert min(r["train/grad_norm"] for r in ds_rows) > 0.05
    plan = json.loads((tmp_path / "ds" / "plan.json").read_text())
    assert (plan["distributed_type"], plan["num_processes"], plan["global_batch"]) == ("DEEPSPEED", 2, 32)
