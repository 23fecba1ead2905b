"""The hot path's parts without processes: the device-side non-finite guard, hooks, the signal flag.

The multi-process behaviour (NaN on one of two ranks, preemption agreed at the flush, exact resume)
is tested through the real launchers in test_nonfinite.py, test_preemption.py and test_resume.py.
"""

from __future__ import annotations

import copy
import os
import signal

import pytest
import torch
from faults import from_env, parse_steps
from hypothesis import given, settings
from hypothesis import strategies as st

from launcher.errors import UsageError
from launcher.hooks import Hook, Hooks, load_hooks
from launcher.nonfinite import NonFiniteGuard
from launcher.preemption import Preemption

NAN, INF = float("nan"), float("inf")


def _model_and_optimizer(fused: bool = True):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, fused=fused)


def _run(guard: NonFiniteGuard, model, optimizer, norms: list[float]) -> list[bool]:
    """Optimizer steps with the given gradient norms (NaN/inf injected into the gradients); which steps
    changed the weights."""
    changed = []
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    for norm in norms:
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        if not torch.isfinite(torch.tensor(norm)):
            next(model.parameters()).grad[0, 0] = norm
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        before = [p.detach().clone() for p in model.parameters()]
        if guard.before_step(grad_norm):
            optimizer.step()
        changed.append(not all(torch.equal(a, b) for a, b in zip(before, model.parameters())))
    return changed


def test_device_skip_leaves_weights_and_optimizer_state_bit_identical():
    model, opt = _model_and_optimizer()
    guard = NonFiniteGuard("skip", 3, torch.device("cpu"), torch_optimizer=opt)
    assert guard.device_skip and not guard.host_skip
    _run(guard, model, opt, [1.0, 1.0])
    weights, state = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    assert _run(guard, model, opt, [NAN]) == [False]
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    after = opt.state_dict()["state"]
    for i, s in state["state"].items():
        assert all(torch.equal(s[k], after[i][k]) for k in s), i  # step count, exp_avg, exp_avg_sq
    assert _run(guard, model, opt, [1.0]) == [True]  # and the next good step trains


@settings(max_examples=40, deadline=None)
@given(max_skips=st.integers(1, 3), norms=st.lists(st.sampled_from([1.0, 1.0, NAN, INF]), min_size=1, max_size=12),
       fused=st.booleans())
def test_the_host_replay_matches_what_the_step_did(max_skips, norms, fused):
    """`decide` at the flush must tell exactly which steps were skipped and where the weights froze,
    for the device skip (fused) and the host fallback (foreach) alike."""
    model, opt = _model_and_optimizer(fused)
    guard = NonFiniteGuard("skip", max_skips, torch.device("cpu"), torch_optimizer=opt)
    assert guard.device_skip == fused and guard.host_skip == (not fused)
    changed = _run(guard, model, opt, norms)
    guard.saw_norms(norms)  # as the trainer's flush does
    events = guard.decide(list(range(1, len(norms) + 1)), [0.0] * len(norms), norms)
    stop = next((e.step for e in events if e.stop), None)
    bad = {e.step for e in events}
    for step, did_change in enumerate(changed, start=1):
        expected = step not in bad and (stop is None or step < stop)
        assert did_change == expected, (step, events, changed)
    if stop is not None:
        assert events[-1].step == stop and all(not e.stop for e in events[:-1])


def test_stop_costs_nothing_per_step_and_stops_at_the_first_bad_step():
    _, opt = _model_and_optimizer()
    guard = NonFiniteGuard("stop", 10, torch.device("cpu"), torch_optimizer=opt)
    assert not guard.device_skip and not guard.host_skip and not hasattr(opt, "found_inf")
    assert not guard.per_step  # the trainer does not even call before_step
    assert guard.before_step(torch.tensor(NAN))  # and when called, the step goes ahead; the flush decides
    guard.saw_norms([1.0, INF, NAN, 1.0])
    events = guard.decide([1, 2, 3, 4], [0.0, 0.0, 1.0, 0.0], [1.0, INF, NAN, 1.0])
    assert [(e.step, e.stop) for e in events] == [(2, True)]


def test_decide_counts_consecutive_skips_across_flushes_and_names_loss_ranks():
    guard = NonFiniteGuard("skip", 2, torch.device("cpu"))  # no optimizer: DeepSpeed-like, loss decides
    assert not guard.device_skip and not guard.host_skip
    first = guard.decide([1, 2], [0.0, 1.0], [1.0, NAN])
    assert [(e.step, e.loss_ranks, e.consecutive, e.stop) for e in first] == [(2, 1, 1, False)]
    second = guard.decide([3], [2.0], [NAN])
    assert [(e.step, e.loss_ranks, e.consecutive, e.stop) for e in second] == [(3, 2, 2, True)]
    assert guard.decide([4], [0.0], [1.0]) == [] and guard.consecutive == 0


def test_an_fp16_scaler_owns_gradient_overflows():
    _, opt = _model_and_optimizer()
    guard = NonFiniteGuard("stop", 1, torch.device("cpu"), torch_optimizer=opt, scaler=True)
    assert not guard.device_skip and not hasattr(opt, "found_inf")
    assert guard.before_step(torch.tensor(INF))
    assert guard.decide([1], [0.0], [INF]) == []  # overflow: the scaler skips and lowers the scale
    assert guard.decide([2], [1.0], [NAN])[0].stop  # a NaN loss still stops


def test_preemption_signal_sets_the_flag_once():
    p = Preemption("SIGUSR1")
    p.install()
    try:
        assert not p.requested
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)  # a repeat (another signal) changes nothing
        assert p.requested and p.received == "SIGUSR1"
    finally:
        p.uninstall()
    assert signal.getsignal(signal.SIGUSR1) is not p._handle
    with pytest.raises(UsageError, match="checkpoint.signal: 'SIGNOPE'"):
        Preemption("SIGNOPE")


class Counter(Hook):
    def __init__(self):
        self.calls = []

    def after_step(self, trainer):
        self.calls.append(("after_step", trainer))

    def on_loss(self, trainer, loss, step):
        return loss * 2


def make_counter():
    return [Counter(), Counter()]


def test_hooks_dispatch_only_overridden_points_and_load_from_specs(monkeypatch, tmp_path):
    c = Counter()
    hooks = Hooks([c, Hook()])
    assert hooks.has("after_step") and hooks.has("on_loss") and not hooks.has("on_save")
    hooks.after_step("T")
    assert c.calls == [("after_step", "T")]
    assert hooks.on_loss("T", 3, step=1) == 6

    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "my_hooks.py").write_text("from launcher.hooks import Hook\nclass Timer(Hook):\n"
                                          "    def on_finish(self, trainer, summary):\n        pass\n"
                                          "NOT_A_HOOK = 3\n")
    loaded = load_hooks(["my_hooks:Timer"], env=f"{__name__}:make_counter")
    assert [type(h).__name__ for h in loaded] == ["Timer", "Counter", "Counter"]
    for spec, message in [("my_hooks", "is not 'package.module:name'"), ("nope_mod:X", "cannot import 'nope_mod'"),
                          ("my_hooks:Missing", "has no 'Missing'"), ("my_hooks:NOT_A_HOOK", "none of the hook methods")]:
        with pytest.raises(UsageError, match=message):
            load_hooks([spec], env="")


def test_test_faults_parse_steps_and_ranks(monkeypatch):
    assert parse_steps("V", "5,7-9:1") == {5: None, 7: 1, 8: 1, 9: 1}
    monkeypatch.setenv("LAUNCHER_INJECT_NONFINITE", "5,7-9:1")
    (faults,) = from_env()
    faults.rank = 1
    assert torch.isnan(faults.on_loss(None, torch.tensor(1.0), 8))
    faults.rank = 0
    assert not torch.isnan(faults.on_loss(None, torch.tensor(1.0), 8))
    monkeypatch.setenv("LAUNCHER_TEST_KILL_AT_STEP", "x")
    with pytest.raises(UsageError, match="LAUNCHER_TEST_KILL_AT_STEP"):
        from_env()


@settings(max_examples=200, deadline=None)
@given(first=st.integers(1, 10_000), epoch=st.integers(0, 100), spe=st.integers(1, 500),
       groups=st.integers(1, 3), shared=st.booleans(),
       values=st.lists(st.tuples(st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([NAN, INF])),
                                 st.one_of(st.floats(0, 1e6), st.sampled_from([NAN, INF])),
                                 st.floats(0, 1.0)), min_size=1, max_size=30))
def test_metrics_lines_are_what_json_writes_for_the_rows(first, epoch, spe, groups, shared, values):
    """The step rows' JSON lines, formatted without dicts on the flush path, match json.dumps of the rows
    character for character (non-finite losses and norms included)."""
    from launcher.rows import metrics_lines, metrics_rows
    from launcher.tracking import json_line

    offset = -first + 1 + (first - 1) % spe  # the first step lands inside the epoch, as at a real flush
    lrs = [[lr] * groups if shared else [lr * (i + 1) for i in range(groups)] for _, _, lr in values]
    losses, norms = [v[0] for v in values], [v[1] for v in values]
    columns = (first, epoch, offset, spe, lrs, losses, norms)
    assert metrics_lines(*columns) == "".join(map(json_line, metrics_rows(*columns)))
