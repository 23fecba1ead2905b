"""The LR range test: the curve maths, --apply's recipe copy, user errors, and real runs (1 and 2
processes through `accelerate launch`, plus a reduced bench/lr_grid.py)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import sys

import numpy as np
import pytest
import yaml

from launcher.config import load_config
from launcher.lr_curve import Smoother, edge_skips, lr_at, suggest
from launcher.recipe_edit import recipe_with

from helpers import ROOT, TINY, assert_usage_error, run, train_ddp

RECIPE = str(ROOT / "recipes" / "mnist1d.yaml")


def find_lr(*args: str, cwd=ROOT, timeout: int = 300):
    return run([sys.executable, "-m", "launcher.find_lr", *args], cwd=cwd, timeout=timeout)


def read_result(out) -> dict:
    return json.loads((out / "lr_find.json").read_text())


# ---------------------------------------------------------------------------------------------
# The curve
# ---------------------------------------------------------------------------------------------


def test_lr_sweep_is_geometric_from_start_to_end():
    lrs = [lr_at(k, 50, 1e-6, 1e-1) for k in range(50)]
    assert lrs[0] == pytest.approx(1e-6, rel=1e-12)
    assert lrs[-1] == pytest.approx(1e-1, rel=1e-12)
    ratios = np.array(lrs[1:]) / np.array(lrs[:-1])
    assert np.allclose(ratios, (1e5) ** (1 / 49), rtol=1e-12)


def test_smoother_is_bias_corrected_ema():
    s = Smoother(0.9)
    assert s.update(2.0) == pytest.approx(2.0)  # no pull toward 0 at the start
    assert s.update(2.0) == pytest.approx(2.0)
    s = Smoother(0.9)
    s.update(1.0)
    # closed form: (0.9 * 0.1 * 1 + 0.1 * 3) / (1 - 0.9^2)
    assert s.update(3.0) == pytest.approx((0.09 * 1 + 0.1 * 3) / (1 - 0.81))


def _valley(num: int = 200, steep_at: float = 1e-3, min_at: float = 3e-2):
    """A loss that falls fastest at `steep_at` (in log lr) and rises after `min_at`."""
    lrs = [lr_at(k, num, 1e-7, 1.0) for k in range(num)]
    x = np.log10(lrs)
    loss = 2.3 - 0.5 * (1 + np.tanh((x - np.log10(steep_at)) / 0.5))
    rise = np.clip(x - np.log10(min_at), 0, None)
    return lrs, list(loss + 3 * rise ** 2)


def test_suggestion_is_the_steepest_descent_before_the_minimum():
    lrs, loss = _valley()
    skip_start, skip_end, half = edge_skips(len(lrs))
    found = suggest(lrs, loss, skip_start, skip_end, half)
    step = lrs[1] / lrs[0]
    assert 1e-3 / step <= found.lr <= 1e-3 * step
    assert found.min_index == int(np.argmin(loss[skip_start:len(loss) - skip_end])) + skip_start
    assert found.min_lr_div_10 == pytest.approx(lrs[found.min_index] / 10)


def test_one_noisy_point_does_not_move_the_suggestion():
    lrs, loss = _valley()
    i = int(np.searchsorted(lrs, 1e-2))
    loss[i] -= 0.08  # one unlucky batch: a two-point difference would pick this point
    skip_start, skip_end, half = edge_skips(len(lrs))
    assert abs(int(np.argmin(np.gradient(loss, np.log(lrs))[skip_start:i + 2])) + skip_start - i) <= 1
    found = suggest(lrs, loss, skip_start, skip_end, half)
    step = lrs[1] / lrs[0]
    assert 1e-3 / step ** 2 <= found.lr <= 1e-3 * step ** 2


def test_no_suggestion_from_a_curve_that_stopped_at_once():
    lrs, loss = _valley(100)
    assert suggest(lrs[:12], loss[:12], 10, 5, 5) is None
    # non-finite values end the usable curve
    assert suggest(lrs, [*loss[:12], math.nan, *loss[13:]], 10, 5, 5) is None


# ---------------------------------------------------------------------------------------------
# --apply: the recipe copy
# ---------------------------------------------------------------------------------------------

COMMENTED = """\
# my recipe: keep this comment
task:
  name: mnist1d   # the task
optim:
  name: adamw
  lr: 5.0e-3      # tuned by hand
  weight_decay: 1.0e-4
schedule:
  plateau:
    enabled: true
    patience: 3
train:
  batch_size: 32
"""


def test_apply_edits_only_the_changed_lines(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(COMMENTED)
    text, kept = recipe_with(str(path), {"optim.lr": 0.00123, "schedule.plateau.patience": 5,
                                         "train.seed": 7})
    assert kept
    lines = text.splitlines()
    assert lines[lines.index("train:") + 2] == "  seed: 7"  # a missing key goes at the end of its section
    lines.remove("  seed: 7")
    changed = [(a, b) for a, b in zip(COMMENTED.splitlines(), lines, strict=True) if a != b]
    # The comment stays in its column (round-trip YAML keeps comments where they were).
    assert changed == [("  lr: 5.0e-3      # tuned by hand", "  lr: 0.00123     # tuned by hand"),
                       ("    patience: 3", "    patience: 5")]
    out = tmp_path / "out.yaml"
    out.write_text(text)
    cfg = load_config(out)
    assert (cfg.optim.lr, cfg.schedule.plateau.patience, cfg.train.seed, cfg.optim.weight_decay) == \
        (0.00123, 5, 7, 1e-4)


def test_apply_inserts_a_missing_lr_and_section(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("# c\noptim:\n  name: adamw\ntrain:\n  batch_size: 16\n")
    text, kept = recipe_with(str(path), {"optim.lr": 2e-05})
    assert kept and "# c" in text
    assert yaml.safe_load(text) == {"optim": {"lr": 2e-05, "name": "adamw"}, "train": {"batch_size": 16}}
    path.write_text("train:\n  batch_size: 16\n")
    text, _ = recipe_with(str(path), {"optim.lr": 0.1})
    assert yaml.safe_load(text) == {"train": {"batch_size": 16}, "optim": {"lr": 0.1}}


def test_apply_keeps_flow_style_and_comments(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("# kept\noptim: {name: adamw, lr: 0.005}  # flow\ntrain:\n  batch_size: 16\n")
    text, kept = recipe_with(str(path), {"optim.lr": 2e-05, "optim.betas": (0.9, 0.95)})
    assert kept and "# kept" in text and "# flow" in text
    assert yaml.safe_load(text) == {"optim": {"name": "adamw", "lr": 2e-05, "betas": [0.9, 0.95]},
                                    "train": {"batch_size": 16}}
    assert isinstance(yaml.safe_load(text)["optim"]["lr"], float)  # 2.0e-05, which YAML 1.1 reads as a float


# ---------------------------------------------------------------------------------------------
# User errors: one line, exit 2, nothing written
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        ([], ["--recipe is required"]),
        (["--recipe", "missing.yaml"], ["recipe file not found"]),
        (["--recipe", RECIPE, "--start_lr", "0"], ["--start_lr", "> 0"]),
        (["--recipe", RECIPE, "--start_lr", "1e-2", "--end_lr", "1e-3"], ["--end_lr", "larger"]),
        (["--recipe", RECIPE, "--num_steps", "5"], ["--num_steps", ">= 10"]),
        (["--recipe", RECIPE, "--num_steps", "abc"], ["--num_steps"]),
        (["--recipe", RECIPE, "--beta", "1"], ["--beta"]),
        (["--recipe", RECIPE, "--optim.lrr=0.1"], ["optim.lrr", "did you mean optim.lr?"]),
        (["--recipe", RECIPE, "--plot", "/dev/null/x.png"], ["--plot", "is a file, not a directory"]),
        (["--recipe", RECIPE, "--output_dir", "/dev/null/out"], ["--output_dir", "is a file, not a directory"]),
        (["--recipe", RECIPE, "--apply", "no_such_dir/out.yaml"], ["--apply", "does not exist"]),
        (["--recipe", RECIPE, "--train.batch_size=5000"], ["train.batch_size", "lower"]),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(tmp_path, args, fragments):
    r = find_lr(*args, cwd=tmp_path)
    assert_usage_error(r, *fragments)
    assert list(tmp_path.iterdir()) == []


def test_existing_output_dir_and_apply_file_are_not_touched(tmp_path):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    assert_usage_error(find_lr("--recipe", RECIPE, "--output_dir", str(busy), cwd=tmp_path), "busy", "already exists")
    assert [p.name for p in busy.iterdir()] == ["keep.txt"] and (busy / "keep.txt").read_text() == "mine"
    target = tmp_path / "out.yaml"
    target.write_text("mine")
    r = find_lr("--recipe", RECIPE, "--apply", str(target), "--output_dir", str(tmp_path / "new"), cwd=tmp_path)
    assert_usage_error(r, "--apply", "already exists")
    assert target.read_text() == "mine" and not (tmp_path / "new").exists()


# ---------------------------------------------------------------------------------------------
# Real runs
# ---------------------------------------------------------------------------------------------


def test_run_writes_curve_plot_and_a_loadable_recipe(tmp_path):
    recipe_hash = hashlib.sha256((ROOT / "recipes" / "mnist1d.yaml").read_bytes()).hexdigest()
    out, applied = tmp_path / "find", tmp_path / "tuned.yaml"
    r = find_lr("--recipe", RECIPE, "--output_dir", str(out), "--num_steps", "120", "--apply", str(applied),
                "--train.batch_size=32", "--optim.weight_decay=0.01", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    res = read_result(out)
    n = len(res["lrs"])
    assert n == len(res["losses"]) == len(res["smoothed"]) and 0 < n <= 120
    assert res["lrs"][0] == pytest.approx(1e-7) and res["stop_reason"]
    # the smoothed column is the bias-corrected EMA of the losses column
    s = Smoother(res["beta"])
    assert res["smoothed"] == pytest.approx([s.update(v) for v in res["losses"]], rel=1e-9)
    i = res["suggestion_index"]
    assert res["suggestion"] == res["lrs"][i] and res["lr_scale"] == 1
    assert res["min_lr_div_10"] == pytest.approx(res["lrs"][res["min_index"]] / 10)
    assert f"suggested lr: {res['suggestion']:.3g}" in r.stdout
    assert "minimum / 10" in r.stdout
    assert (out / "lr_find.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # --apply: the recipe with the suggestion and the overrides, comments kept; the recipe itself untouched
    cfg = load_config(applied)
    expected = load_config(RECIPE, {"train.batch_size": 32, "optim.weight_decay": 0.01, "optim.lr": cfg.optim.lr})
    assert cfg == dataclasses.replace(expected, name=cfg.name)
    assert cfg.optim.lr == pytest.approx(res["suggestion"], rel=5e-3)
    assert applied.read_text().startswith("# MNIST-1D")
    assert hashlib.sha256((ROOT / "recipes" / "mnist1d.yaml").read_bytes()).hexdigest() == recipe_hash
    assert sorted(p.name for p in tmp_path.iterdir()) == ["find", "tuned.yaml"]


def test_lr_scaling_reports_the_base_lr_and_divergence_stops_early(tmp_path):
    out = tmp_path / "scaled"
    r = find_lr("--recipe", RECIPE, *TINY, "--output_dir", str(out), "--plot", "none", "--num_steps", "60",
                "--end_lr", "1e4", "--train.batch_size=16", "--optim.lr_scaling=linear",
                "--optim.reference_batch_size=64", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    res = read_result(out)
    assert res["lr_scale"] == pytest.approx(0.25) and res["global_batch"] == 16
    assert res["suggestion"] == pytest.approx(res["suggestion_lr"] / 0.25)
    assert res["suggestion_lr"] == res["lrs"][res["suggestion_index"]]
    assert len(res["lrs"]) < 60
    assert "exceeded" in res["stop_reason"] or "non-finite" in res["stop_reason"]
    assert max(res["smoothed"]) > 4 * min(res["smoothed"]) or not math.isfinite(res["smoothed"][-1])
    assert f"suggested lr: {res['suggestion']:.3g}" in r.stdout
    assert [p.name for p in out.iterdir()] == ["lr_find.json"]


@pytest.mark.slow
def test_two_processes_give_the_suggestion_of_one(tmp_path):
    """Same global batch (1 x 32, 2 x 16, 1 x 16 x 2 accumulation): EpochSampler feeds every optimizer
    step the same 32 samples, so the curve and the suggestion agree up to float noise."""
    common = ["--recipe", RECIPE, "--plot", "none", "--num_steps", "200"]
    one, two, accum = tmp_path / "one", tmp_path / "two", tmp_path / "accum"
    r1 = find_lr(*common, "--output_dir", str(one), "--train.batch_size=32", cwd=tmp_path)
    assert r1.returncode == 0, r1.stderr[-3000:]
    r2 = train_ddp(*common, "--output_dir", str(two), "--train.batch_size=16", module="launcher.find_lr",
                   cwd=tmp_path)
    assert r2.returncode == 0, r2.stderr[-3000:]
    r3 = find_lr(*common, "--output_dir", str(accum), "--train.batch_size=16", "--train.grad_accum_steps=2",
                 cwd=tmp_path)
    assert r3.returncode == 0, r3.stderr[-3000:]
    a, b, c = read_result(one), read_result(two), read_result(accum)
    assert b["num_processes"] == 2 and a["global_batch"] == b["global_batch"] == c["global_batch"] == 32
    assert r2.stdout.count("suggested lr:") == 1  # printed by the main process only
    for other in (b, c):
        assert other["suggestion_index"] == a["suggestion_index"]
        assert other["suggestion"] == pytest.approx(a["suggestion"], rel=1e-6)
        assert other["min_index"] == a["min_index"]
        upto = a["min_index"] + 1  # past the minimum the LR is high enough for float noise to grow
        assert other["losses"][:upto] == pytest.approx(a["losses"][:upto], rel=1e-4)
    assert next(line for line in r2.stdout.splitlines() if line.startswith("suggested lr:")) == \
        next(line for line in r1.stdout.splitlines() if line.startswith("suggested lr:"))


def test_reduced_lr_grid_bench(tmp_path):
    out = tmp_path / "grid"
    r = run([sys.executable, str(ROOT / "bench" / "lr_grid.py"), "--lrs", "1e-3,3e-2", "--seeds", "0",
             "--num_epochs", "1", "--output_dir", str(out), f"--train_args={' '.join(TINY)}",
             f"--find_lr_args={' '.join(TINY)} --num_steps=60 --plot=none"], cwd=tmp_path)
    assert r.returncode in (0, 1), r.stderr[-3000:]  # 1: the suggestion is not within the tolerance
    grid = json.loads((out / "grid.json").read_text())
    # Every number is read back from what the runs and find_lr wrote, and the verdict recomputed from them.
    evals = {}
    for lr in (1e-3, 3e-2):
        rows = [json.loads(line) for line in (out / f"lr{lr:g}-seed0" / "metrics.jsonl").read_text().splitlines()]
        evals[lr] = [row for row in rows if "val/accuracy" in row]
    assert [row["lr"] for row in grid["table"]] == [1e-3, 3e-2]
    assert [row["best_val_accuracy"] for row in grid["table"]] == \
        [max(e["val/accuracy"] for e in evals[lr]) for lr in (1e-3, 3e-2)]
    best_lr = max(evals, key=lambda lr: (max(e["val/accuracy"] for e in evals[lr]),
                                          -min(e["val/loss"] for e in evals[lr])))
    suggestion = json.loads((out / "find_lr" / "lr_find.json").read_text())["suggestion"]
    within = 1 / 3 <= suggestion / best_lr <= 3
    assert (grid["best_lr"], grid["suggestion"], grid["within_tolerance"]) == (best_lr, suggestion, within)
    assert r.returncode == (0 if within else 1)
    assert f"grid best lr: {grid['best_lr']:g}" in r.stdout
