"""The LR schedule when the number of steps left changes mid-run (elastic runs with --batch-per-rank),
and reading the data position of a checkpoint (dtrain/train/schedule.py)."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dtrain.config import Config, OptimConfig, TrainConfig
from dtrain.data.plan import Position
from dtrain.train.schedule import checkpoint_position, lr_factor, refit_schedule, schedule_progress

pytestmark = pytest.mark.unit

SCHEDULES = ["constant", "cosine", "step", "invscaling"]


def config(schedule: str, warmup: int) -> Config:
    return Config(optim=OptimConfig(schedule=schedule, warmup_steps=warmup))


def legacy_lr_factor(cfg: Config, step: int, total_steps: int) -> float:
    """lr_factor as it was before schedules could be refitted: the fixed-batch path must not change."""
    o = cfg.optim
    if step < o.warmup_steps:
        return (step + 1) / o.warmup_steps
    progress = (step - o.warmup_steps) / max(1, total_steps - o.warmup_steps)
    if o.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    if o.schedule == "step":
        return 0.1 ** int(min(progress, 0.999) * 3)
    if o.schedule == "invscaling":
        return float((1 + step - o.warmup_steps) ** -o.power_t)
    return 1.0


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(SCHEDULES), st.integers(0, 50), st.integers(1, 2000), st.data())
def test_a_schedule_never_refitted_is_bit_for_bit_the_plain_one(schedule: str, warmup: int, total: int,
                                                                data: st.DataObject) -> None:
    cfg = config(schedule, warmup)
    step = data.draw(st.integers(0, total), label="step")
    assert lr_factor(cfg, step, total) == legacy_lr_factor(cfg, step, total)
    fitted = refit_schedule(cfg, 0, (0, 0.0, 0, 0), total, 64)
    assert fitted == (0, 0.0, total, 64)
    assert refit_schedule(cfg, step, fitted, total, 64) is fitted  # nothing changed: nothing to refit
    assert lr_factor(cfg, step, total, fitted[:2]) == legacy_lr_factor(cfg, step, total)


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(["cosine", "step"]), st.integers(0, 30), st.lists(st.integers(10, 400), min_size=2,
                                                                          max_size=5), st.data())
def test_a_refitted_schedule_is_continuous_and_ends_on_the_last_step(
        schedule: str, warmup: int, totals: list[int], data: st.DataObject) -> None:
    cfg = config(schedule, warmup)
    state, step = refit_schedule(cfg, 0, (0, 0.0, 0, 0), totals[0], 1), 0
    for world, total in enumerate(totals[1:], 2):
        step = data.draw(st.integers(step, state[2] - 1), label="step of the world change")
        new_total = max(total, step + 1)  # the steps done so far stay done
        before = schedule_progress(cfg, step, state[2], state[:2])
        state = refit_schedule(cfg, step, state, new_total, 32 * world)
        assert schedule_progress(cfg, step, new_total, state[:2]) == pytest.approx(before, abs=1e-12)
        if step < warmup:  # a change during warm-up: the decay is still all ahead
            assert state[1] == 0.0
    last = state[2]
    if last > warmup:
        assert schedule_progress(cfg, last, last, state[:2]) == pytest.approx(1.0)
    # Progress never goes backwards.
    values = [schedule_progress(cfg, s, last, state[:2]) for s in range(step, last + 1)]
    assert all(b >= a - 1e-12 for a, b in itertools.pairwise(values))


def test_refit_example_cosine_halfway_then_the_world_doubles() -> None:
    cfg = config("cosine", 0)
    state = refit_schedule(cfg, 0, (0, 0.0, 0, 0), 200, 32)
    assert lr_factor(cfg, 100, 200, state[:2]) == pytest.approx(0.5)  # halfway: cos(pi/2)
    state = refit_schedule(cfg, 100, state, 150, 64)  # twice the batch: 50 steps left instead of 100
    assert state == (100, 0.5, 150, 64)
    assert lr_factor(cfg, 100, 150, state[:2]) == pytest.approx(0.5)
    assert lr_factor(cfg, 125, 150, state[:2]) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.75)))
    assert lr_factor(cfg, 150, 150, state[:2]) == pytest.approx(0.0)


def test_a_changed_run_length_fits_the_schedule_anew() -> None:
    # Same batch, another total: resumed with other --max-steps or --epochs, as a fixed batch does.
    cfg = config("cosine", 10)
    assert refit_schedule(cfg, 37, (0, 0.0, 37, 64), 300, 64) == (0, 0.0, 300, 64)
    # A schedule that had ended (the run stopped at --max-steps) is not stretched: it starts over.
    assert refit_schedule(cfg, 37, (0, 0.0, 37, 64), 300, 32) == (0, 0.0, 300, 32)
    assert refit_schedule(cfg, 20, (0, 0.0, 37, 64), 300, 32)[:2] == (20, pytest.approx(10 / 27))


def checkpoint(position: dict[str, int], train: TrainConfig, world: int) -> dict[str, object]:
    return {"position": position, "config": Config(train=train).to_dict(), "world_size": world}


def test_checkpoint_position_reads_the_row() -> None:
    ckpt = checkpoint({"epoch": 1, "step": 7, "row": 301}, TrainConfig(batch_per_rank=32), 3)
    assert checkpoint_position(ckpt) == Position(1, 7, 301)


@pytest.mark.parametrize(("train", "world", "row"), [
    (TrainConfig(global_batch_size=64), 3, 7 * 64),
    (TrainConfig(batch_per_rank=32), 3, 7 * 96),
])
def test_checkpoint_position_of_older_checkpoints_follows_from_their_batch(train: TrainConfig, world: int,
                                                                          row: int) -> None:
    # Written before positions had a row: (epoch, step) of a plan cut with that run's global batch.
    assert checkpoint_position(checkpoint({"epoch": 2, "step": 7}, train, world)) == Position(2, 7, row)
