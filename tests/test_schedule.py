"""The LR recipe against hand-written tables, closed forms, torch's ReduceLROnPlateau and properties."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from launcher.config import PlateauConfig, ScheduleConfig
from launcher.schedule import LRScheduler, preview, scheduled_lr

from helpers import run


def sched(**kw) -> ScheduleConfig:
    plateau = kw.pop("plateau", None)
    return ScheduleConfig(**kw, plateau=PlateauConfig(**plateau) if plateau else PlateauConfig())


def lrs(cfg: ScheduleConfig, base=1.0, warmup=0, spe=4, total=20) -> list[float]:
    return preview(cfg, base, warmup, spe, total)["steps"]


def test_warmup_table():
    # W=4 from 0: steps 1..4 use 1/4, 2/4, 3/4, 1; then constant.
    assert lrs(sched(), base=0.1, warmup=4, total=6) == pytest.approx([0.025, 0.05, 0.075, 0.1, 0.1, 0.1])
    # start factor 0.2: 0.2 + 0.8 * k / 4
    assert lrs(sched(warmup_start_factor=0.2), warmup=4, total=5) == pytest.approx([0.4, 0.6, 0.8, 1.0, 1.0])


def test_exponential_smooth_starts_after_warmup():
    # spe=4, W=4: step 5 is the first after warmup (0 steps done since) -> base; step 9 -> rate^1.
    cfg = sched(decay="exponential", decay_rate=0.5)
    out = lrs(cfg, warmup=4, spe=4, total=13)
    assert out[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    expected = [0.5 ** ((k - 1 - 4) / 4) for k in range(5, 14)]
    assert out[4:] == pytest.approx(expected)
    assert out[8] == pytest.approx(0.5)  # step 9: one epoch after warmup
    assert out[12] == pytest.approx(0.25)  # step 13: two epochs after warmup


def test_exponential_staircase_changes_only_at_epoch_boundaries():
    cfg = sched(decay="exponential", decay_rate=0.96, staircase=True)
    out = lrs(cfg, base=5e-3, warmup=0, spe=3, total=9)
    assert out == pytest.approx([5e-3] * 3 + [5e-3 * 0.96] * 3 + [5e-3 * 0.96**2] * 3)


def test_closed_form_write_up_recipe():
    # AdamW 5e-3, 3 warmup epochs, 0.96 per epoch: LR at the end of epoch e (e > 3).
    spe = 125
    cfg = sched(decay="exponential", decay_rate=0.96)
    result = preview(cfg, 5e-3, 3 * spe, spe, 20 * spe)
    epochs = {row["epoch"]: row["lr"] for row in result["epochs"]}
    assert epochs[1] == pytest.approx(5e-3 / 3)
    assert epochs[3] == pytest.approx(5e-3)
    for e in range(4, 21):
        done = e * spe - 1 - 3 * spe
        assert epochs[e] == pytest.approx(5e-3 * 0.96 ** (done / spe), rel=1e-12)
    assert result["epochs"][0]["phase"] == "warmup" and result["epochs"][5]["phase"] == "exponential"


def test_floor_applies_after_warmup_only():
    cfg = sched(decay="exponential", decay_rate=0.1, min_lr=0.3)
    out = lrs(cfg, base=1.0, warmup=4, spe=1, total=8)
    assert out[0] == pytest.approx(0.25)  # warmup may start below the floor
    assert min(out[4:]) == pytest.approx(0.3)
    assert out[5] == pytest.approx(0.3)  # 1.0 * 0.1 floored


def test_cosine_and_linear_reach_min_lr():
    cos = lrs(sched(decay="cosine", min_lr=0.1), warmup=2, spe=2, total=12)
    assert cos[2] == pytest.approx(1.0)
    horizon = 10
    for k in range(3, 13):
        done = k - 1 - 2
        assert cos[k - 1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * done / horizon)))
    lin = lrs(sched(decay="linear"), warmup=0, spe=2, total=10)
    assert lin == pytest.approx([1 - k / 10 for k in range(10)])


def test_per_group_base_lrs_are_scaled_alike():
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD([{"params": [model.weight], "lr": 1.0}, {"params": [model.bias], "lr": 0.1}], lr=1.0)
    s = LRScheduler(opt, sched(decay="exponential", decay_rate=0.5), [1.0, 0.1], 2, 2, 10)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.5, 0.05])
    for _ in range(3):  # next is step 4: one step after warmup ended -> half an epoch of decay
        s.apply(s.next_step + 1)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.5**0.5, 0.1 * 0.5**0.5])


def _run_plateau_against_torch(values, plateau_kw):
    """Our plateau factor on a constant schedule vs torch's ReduceLROnPlateau on the same metrics."""
    model = torch.nn.Linear(1, 1)
    ref_opt = torch.optim.SGD(model.parameters(), lr=1.0)
    ref = torch.optim.lr_scheduler.ReduceLROnPlateau(
        ref_opt, mode=plateau_kw["mode"], factor=plateau_kw["factor"], patience=plateau_kw["patience"],
        cooldown=plateau_kw["cooldown"], threshold=plateau_kw["threshold"], min_lr=plateau_kw["min_lr"])
    ours = LRScheduler(None, sched(plateau={"enabled": True, "metric": "val/loss", **plateau_kw}), [1.0], 0, 1, 1000)
    for epoch, v in enumerate(values, start=1):
        ours.apply(ours.next_step + 1)
        ref.step(v)
        ours.end_epoch(epoch, {"val/loss": v})
        assert ours.get_last_lr()[0] == pytest.approx(ref_opt.param_groups[0]["lr"]), f"epoch {epoch}"
    return ours


def test_plateau_matches_torch_reduce_on_plateau():
    values = [1.0, 0.9, 0.95, 0.95, 0.95, 0.95, 0.95, 0.94, 0.96, 0.97, 0.98, 0.99, 1.0, 0.5, 0.6, 0.6, 0.6, 0.6, 0.6]
    kw = dict(mode="min", factor=0.5, patience=3, cooldown=2, threshold=1e-4, min_lr=0.0)
    ours = _run_plateau_against_torch(values, kw)
    assert ours.plateau.num_reductions >= 2  # the sequence really exercises reductions and cooldown


@settings(max_examples=60, deadline=None)
@given(values=st.lists(st.floats(0.0, 2.0), min_size=1, max_size=40),
       patience=st.integers(0, 4), cooldown=st.integers(0, 3), mode=st.sampled_from(["min", "max"]),
       min_lr=st.sampled_from([0.0, 0.2]))
def test_plateau_matches_torch_property(values, patience, cooldown, mode, min_lr):
    _run_plateau_against_torch(values, dict(mode=mode, factor=0.5, patience=patience, cooldown=cooldown,
                                            threshold=1e-4, min_lr=min_lr))


def test_plateau_ignores_epochs_inside_warmup_and_multiplies_decay():
    cfg = sched(decay="exponential", decay_rate=0.9,
                plateau={"enabled": True, "patience": 0, "cooldown": 0, "factor": 0.5})
    s = LRScheduler(None, cfg, [1.0], warmup_steps=4, steps_per_epoch=2, total_steps=20)
    for epoch in (1, 2):  # two epochs inside warmup with a worsening metric: no reduction
        s.apply(s.next_step + 1)
        s.apply(s.next_step + 1)
        assert s.end_epoch(epoch, {"val/loss": float(epoch)}) is None
    assert s.plateau.factor == 1.0
    s.apply(s.next_step + 1)
    s.apply(s.next_step + 1)
    message = s.end_epoch(3, {"val/loss": 5.0})  # first bad epoch after warmup, patience 0 -> reduce
    assert message and "val/loss has not improved for 1 epochs" in message and "->" in message
    k = s.next_step
    assert s.get_last_lr()[0] == pytest.approx(0.5 * 0.9 ** ((k - 1 - 4) / 2))


def test_plateau_min_lr_bounds_reductions():
    cfg = sched(plateau={"enabled": True, "patience": 0, "cooldown": 0, "factor": 0.1, "min_lr": 0.05})
    s = LRScheduler(None, cfg, [1.0], 0, 1, 100)
    s.end_epoch(1, {"val/loss": 1.0})
    for e in range(2, 6):
        s.end_epoch(e, {"val/loss": 2.0})
    assert s.get_last_lr()[0] == pytest.approx(0.05)


def test_missing_plateau_metric_is_named():
    s = LRScheduler(None, sched(plateau={"enabled": True, "metric": "val/f1"}), [1.0], 0, 1, 10)
    with pytest.raises(KeyError, match="val/f1"):
        s.end_epoch(1, {"val/loss": 1.0})


@settings(max_examples=80, deadline=None)
@given(warmup=st.integers(0, 30), spe=st.integers(1, 20), epochs=st.integers(1, 8),
       decay=st.sampled_from(["constant", "exponential", "cosine", "linear"]), staircase=st.booleans(),
       start=st.floats(0.0, 1.0), rate=st.floats(0.5, 1.0))
def test_phases_are_monotone(warmup, spe, epochs, decay, staircase, start, rate):
    total = spe * epochs
    cfg = sched(decay=decay, decay_rate=rate, staircase=staircase, warmup_start_factor=start)
    out = lrs(cfg, base=1.0, warmup=warmup, spe=spe, total=total)
    w = min(warmup, total)
    assert all(a <= b + 1e-12 for a, b in zip(out[:w], out[1:w]))  # warmup never decreases
    after = out[w:]
    assert all(a >= b - 1e-12 for a, b in zip(after, after[1:]))  # decay never increases
    assert all(0 <= x <= 1.0 + 1e-12 for x in out)
    assert all(x == scheduled_lr(k + 1, 1.0, cfg, warmup, spe, total) for k, x in enumerate(out))


@settings(max_examples=40, deadline=None)
@given(values=st.lists(st.floats(0.0, 3.0), min_size=2, max_size=25), cut=st.integers(1, 24),
       cooldown=st.integers(1, 4), patience=st.integers(0, 2))
def test_state_dict_round_trip_mid_cooldown(values, cut, cooldown, patience):
    """Save after `cut` epochs (often mid-cooldown), load into a fresh scheduler: identical LRs after."""
    cut = min(cut, len(values) - 1)
    cfg = sched(decay="exponential", decay_rate=0.9,
                plateau={"enabled": True, "patience": patience, "cooldown": cooldown, "factor": 0.5})
    ref = LRScheduler(None, cfg, [1.0], 3, 2, 200)
    resumed = None
    for epoch, v in enumerate(values, start=1):
        for _ in range(2):
            ref.apply(ref.next_step + 1)
            if resumed:
                resumed.apply(resumed.next_step + 1)
        ref.end_epoch(epoch, {"val/loss": v})
        if resumed:
            resumed.end_epoch(epoch, {"val/loss": v})
            assert resumed.get_last_lr() == ref.get_last_lr()
            assert resumed.state_dict() == ref.state_dict()
        if epoch == cut:
            state = json.loads(json.dumps(ref.state_dict()))  # must survive serialisation
            resumed = LRScheduler(None, cfg, [1.0], 3, 2, 200)
            resumed.load_state_dict(state)
            resumed.apply(ref.next_step)  # the trainer applies its own step after loading
            assert resumed.get_last_lr() == ref.get_last_lr()


def run_preview(*args: str) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "launcher.schedule", *args], timeout=120)


def test_preview_cli_table_json_and_plot(tmp_path):
    r = run_preview("--recipe", "recipes/mnist1d.yaml", "--steps_per_epoch", "10", "--num_epochs", "5")
    assert r.returncode == 0, r.stderr
    assert "Epoch 1: 0.02 (warmup)" in r.stdout
    assert "plateau" in r.stdout and "not in this preview" in r.stdout
    plot = tmp_path / "lr.png"
    r = run_preview("--recipe", "recipes/mnist1d.yaml", "--steps_per_epoch", "10", "--num_epochs", "5", "--json",
                    "--plot", str(plot), "--optim.lr=0.01")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert len(data["steps"]) == 50 and data["steps"][9] == pytest.approx(0.01)
    assert [e["epoch"] for e in data["epochs"]] == [1, 2, 3, 4, 5]
    assert _line_pixels(plot, (840, 420)) > 500  # the LR curve is drawn


def _line_pixels(path, size: tuple[int, int]) -> int:
    """Pixels of the plotted line's colour in a PNG that must decode to `size` (7 x 3.5 in at 120 dpi)."""
    import matplotlib.image
    import numpy as np

    image = matplotlib.image.imread(path)
    assert (image.shape[1], image.shape[0]) == size, image.shape
    rgb = image[..., :3]
    assert len(np.unique(rgb.reshape(-1, 3), axis=0)) > 1
    line = np.array([0x1F, 0x77, 0xB4]) / 255  # matplotlib's first line colour
    return int((np.abs(rgb - line).max(axis=-1) < 0.05).sum())


def test_preview_cli_errors():
    r = run_preview("--recipe", "recipes/mnist1d.yaml", "--optim.lr=-1")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "optim.lr" in r.stderr
    assert "Traceback" not in r.stderr


def test_preview_plot_creates_its_directory_and_format_json(tmp_path, capsys):
    from launcher.schedule import main

    plot = tmp_path / "new" / "deeper" / "lr.png"
    main(recipe="recipes/mnist1d.yaml", steps_per_epoch=10, num_epochs=2, plot=str(plot), format="json")
    data = json.loads(capsys.readouterr().out)
    assert len(data["steps"]) == 20
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
