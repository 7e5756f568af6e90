"""The step policy (dtrain/policy.py): what each step does and why a run stopped, without a cluster."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dtrain.policy import StepPolicy, scheduler_wait, stop_reason

pytestmark = pytest.mark.unit


def _synced_steps(policy: StepPolicy, steps: int, epoch_steps: int, cut: bool = False) -> list[int]:
    """The steps (counted from 1) after which the ranks combine, over ``steps`` steps in epochs of ``epoch_steps``."""
    return [g + 1 for g in range(steps) if policy.sync(g, (g + 1) % epoch_steps == 0, cut)]


def test_every_step_syncs_without_local_sgd():
    policy = StepPolicy(total_steps=10)
    assert _synced_steps(policy, 10, 4) == list(range(1, 11))


def test_local_sgd_syncs_every_k_steps_and_on_the_last():
    policy = StepPolicy(total_steps=10, sync_every=4)
    assert _synced_steps(policy, 10, 100) == [4, 8, 10]


def test_local_sgd_syncs_at_each_segment_end_when_following_and_at_a_cut_epoch_end():
    follow = StepPolicy(total_steps=100, sync_every=4, follow=True)
    assert _synced_steps(follow, 12, 6) == [4, 6, 8, 12]
    plain = StepPolicy(total_steps=100, sync_every=4)
    assert _synced_steps(plain, 12, 6) == [4, 8, 12]
    assert _synced_steps(plain, 12, 6, cut=True) == [4, 6, 8, 12]


def test_metrics_lines_every_log_every_steps_at_the_end_and_at_segment_ends():
    policy = StepPolicy(total_steps=25, log_every=10)
    assert [s for s in range(1, 26) if policy.log(s, False, rows=5)] == [10, 20, 25]
    assert not policy.log(10, False, rows=0)  # nothing counted since the last line (local SGD between syncs)
    assert StepPolicy(total_steps=25, log_every=10, follow=True).log(7, True, rows=5)
    assert not policy.log(7, True, rows=5)


def test_stop_on_a_vote_or_at_the_last_step():
    policy = StepPolicy(total_steps=5)
    assert not policy.stop(4, False)
    assert policy.stop(4, True)
    assert policy.stop(5, False)


def test_commits_only_in_elastic_runs_after_a_sync():
    policy = StepPolicy(total_steps=100, commit_every=20, elastic=True)
    assert policy.commit(40, True)
    assert not policy.commit(40, False)
    assert not policy.commit(41, True)
    assert not StepPolicy(total_steps=100, commit_every=20).commit(40, True)
    assert policy.may_checkpoint(True) and not policy.may_checkpoint(False)


@given(st.integers(1, 50), st.integers(1, 8), st.integers(1, 20))
def test_the_last_step_always_syncs_logs_and_stops(total, sync_every, log_every):
    policy = StepPolicy(total_steps=total, sync_every=sync_every, log_every=log_every)
    assert policy.sync(total - 1, False, False)
    assert policy.log(total, False, rows=1)
    assert policy.stop(total, False)


def test_stop_reasons_in_order_of_precedence():
    base = dict(online=False, samples=100, max_samples=None, global_step=10, max_steps=None, idle=False)
    assert stop_reason(**base) == "epochs"
    assert stop_reason(**{**base, "online": True}) == "end_of_data"
    assert stop_reason(**{**base, "idle": True}) == "idle_timeout"
    assert stop_reason(**{**base, "max_steps": 10, "idle": True}) == "max_steps"
    assert stop_reason(**{**base, "max_steps": 11}) == "epochs"
    assert stop_reason(**{**base, "max_samples": 100, "max_steps": 10}) == "max_samples"


def test_divergence_is_the_smoothed_loss_above_factor_times_its_lowest_or_not_finite():
    from dtrain.policy import Divergence

    falling = Divergence(4.0)
    assert not any(falling.update(loss) for loss in [2.0, 1.5, 1.2, 1.0, 0.9, 0.95, 1.1])  # noise is not divergence
    from dtrain.tools.lr_find import smooth, suggest

    losses = [1.0, 0.8, 0.6, 0.5, 2, 8, 32, 128, 512]
    rising = Divergence(4.0)
    seen = [rising.update(loss) for loss in losses]
    # It stops where lr_find's analysis cuts the record, and its low is the smoothed curve's.
    assert seen.index(True) == suggest([10.0**i for i in range(len(losses))], losses)[1] == 6
    assert rising.lowest == pytest.approx(min(smooth(losses)))
    assert Divergence(4.0).update(float("nan")) and Divergence(4.0).update(float("inf"))


@given(world=st.integers(1, 16), ready=st.integers(0, 16), late=st.integers(0, 16), signals=st.integers(0, 16))
def test_waiting_for_the_scheduler_carries_on_only_with_every_rank_ready_and_no_signal(world, ready, late, signals):
    ready, late, signals = min(ready, world), min(late, world), min(signals, world)
    turn = scheduler_wait(world, ready, late, signals)
    if signals:
        assert turn == "stop"  # a signal ends the wait at once, as it ends training
    elif ready == world:
        assert turn == "carry_on"  # even if a rank's time ran out as it got its client back
    else:
        assert turn == ("stop" if late else "wait")  # one rank out of time stops them all


def test_the_wait_for_the_scheduler_goes_on_while_a_rank_is_not_back_in_time():
    assert [scheduler_wait(2, r, late, 0) for r, late in [(0, 0), (1, 0), (1, 1), (2, 0)]] == [
        "wait", "wait", "stop", "carry_on"]
