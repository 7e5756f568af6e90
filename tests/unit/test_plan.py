"""Property tests for the epoch plan (dtrain/data/plan.py): the data-order guarantees of DESIGN.md.

Every property is checked on random partition layouts (empty partitions included), global batch sizes,
world sizes, shuffle windows, seeds and epochs. Batch sizes are drawn so that an epoch has at most a
few dozen steps: the properties do not depend on the step count and the file stays fast.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from dtrain.data.plan import EpochPlan, Position, group_by_partition, rank_slice, validate_world

pytestmark = pytest.mark.unit

FAST = settings(max_examples=100, deadline=None)
SLOW = settings(max_examples=60, deadline=None)

sizes_st = st.lists(st.integers(0, 300), min_size=1, max_size=20)
seeds_st = st.integers(0, 2**32 - 1)
epochs_st = st.integers(0, 10_000)
windows_st = st.integers(1, 6)
worlds_st = st.integers(1, 8)


@st.composite
def batch_sizes(draw: st.DrawFn, num_rows: int, max_steps: int = 48) -> int:
    """A global batch size giving at most ``max_steps`` steps; small, boundary and oversized ones too."""
    lo = max(1, math.ceil(num_rows / max_steps))
    return draw(st.one_of(st.integers(lo, lo + 16), st.integers(lo, num_rows + 10)))


@st.composite
def plans(draw: st.DrawFn, *, shuffle: bool | None = None, drop_last: bool | None = None,
          max_steps: int = 48) -> EpochPlan:
    sizes = draw(sizes_st)
    return EpochPlan(
        partition_sizes=tuple(sizes),
        global_batch_size=draw(batch_sizes(sum(sizes), max_steps)),
        seed=draw(seeds_st),
        epoch=draw(epochs_st),
        shuffle=draw(st.booleans()) if shuffle is None else shuffle,
        shuffle_window=draw(windows_st),
        drop_last=draw(st.booleans()) if drop_last is None else drop_last,
    )


def replace(plan: EpochPlan, **changes: object) -> EpochPlan:
    """A fresh plan (no cached state shared with ``plan``) with some parameters changed."""
    params = {
        "partition_sizes": plan.partition_sizes,
        "global_batch_size": plan.global_batch_size,
        "seed": plan.seed,
        "epoch": plan.epoch,
        "shuffle": plan.shuffle,
        "shuffle_window": plan.shuffle_window,
        "drop_last": plan.drop_last,
    }
    params.update(changes)
    return EpochPlan(**params)  # type: ignore[arg-type]


def all_batches(plan: EpochPlan) -> list[np.ndarray]:
    return [plan.global_batch(s) for s in plan.steps()]


def concat(arrays: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(arrays) if arrays else np.empty(0, dtype=np.int64)


def owner(plan: EpochPlan, position: int) -> int:
    """Brute-force partition of a row position (the reference for ``locate``)."""
    for p in range(len(plan.partition_sizes)):
        if plan.offsets[p] <= position < plan.offsets[p + 1]:
            return p
    raise AssertionError(f"position {position} outside the dataset")


# -- exactly once -----------------------------------------------------------------------------------------


@FAST
@given(plans(drop_last=False), worlds_st)
def test_every_row_exactly_once_per_epoch(plan: EpochPlan, world: int) -> None:
    n = plan.num_rows
    assert plan.num_steps == math.ceil(n / plan.global_batch_size)
    seen = concat([plan.rank_batch(s, world, r) for s in plan.steps() for r in range(world)])
    assert seen.dtype.kind == "i"
    assert len(seen) == n
    np.testing.assert_array_equal(np.sort(seen), np.arange(n))
    # Every batch is full but possibly the last one.
    rows = [plan.batch_rows(s) for s in plan.steps()]
    assert all(r == plan.global_batch_size for r in rows[:-1])
    assert sum(rows) == n
    assert all(r > 0 for r in rows)


@FAST
@given(plans(drop_last=True), worlds_st)
def test_drop_last_drops_exactly_the_partial_tail(plan: EpochPlan, world: int) -> None:
    n, b = plan.num_rows, plan.global_batch_size
    full_steps, tail = divmod(n, b)
    assert plan.num_steps == full_steps
    kept = concat([plan.rank_batch(s, world, r) for s in plan.steps() for r in range(world)])
    assert len(kept) == full_steps * b
    assert len(np.unique(kept)) == len(kept)
    assert all(plan.batch_rows(s) == b for s in plan.steps())

    # The same epoch without drop_last: identical full batches, and the dropped rows are exactly
    # the rows of its last, partial batch.
    keep_all = replace(plan, drop_last=False)
    full = all_batches(keep_all)
    for s in plan.steps():
        np.testing.assert_array_equal(plan.global_batch(s), full[s])
    missing = np.setdiff1d(np.arange(n), kept)
    if tail:
        assert len(full) == full_steps + 1
        np.testing.assert_array_equal(missing, np.sort(full[-1]))
        np.testing.assert_array_equal(missing, np.sort(plan.order(full_steps * b, n)))
    else:
        assert len(missing) == 0
        assert len(full) == full_steps


# -- independence from the world size ---------------------------------------------------------------------


@SLOW
@given(plans(max_steps=16))
def test_rank_slices_concatenate_to_the_global_batch_for_every_world(plan: EpochPlan) -> None:
    for step in plan.steps():
        expected = plan.global_batch(step)
        assert len(expected) == plan.batch_rows(step)
        for world in range(1, 9):
            got = concat([plan.rank_batch(step, world, r) for r in range(world)])
            np.testing.assert_array_equal(got, expected, err_msg=f"step {step}, world {world}")


@FAST
@given(plans(), st.data())
def test_order_ranges_are_slices_of_the_epoch_order(plan: EpochPlan, data: st.DataObject) -> None:
    # order(start, stop) is a slice of the full epoch order, whatever the cut.
    n = plan.num_rows
    full = plan.order(0, n)
    start = data.draw(st.integers(0, n + 3), label="start")
    stop = data.draw(st.integers(0, n + 3), label="stop")
    np.testing.assert_array_equal(plan.order(start, stop), full[start:stop] if start < stop else full[:0])
    np.testing.assert_array_equal(plan.order(0, n + 100), full)
    for s in plan.steps():
        lo, hi = plan.batch_bounds(s)
        np.testing.assert_array_equal(plan.global_batch(s), full[lo:hi])


@FAST
@given(st.integers(0, 5000), worlds_st)
def test_rank_slice_sizes_are_balanced_and_tile_the_batch(batch_rows: int, world: int) -> None:
    slices = [rank_slice(batch_rows, world, r) for r in range(world)]
    sizes = [hi - lo for lo, hi in slices]
    assert sum(sizes) == batch_rows
    assert max(sizes) - min(sizes) <= 1
    assert min(sizes) >= 0
    # Contiguous, in rank order, covering [0, batch_rows).
    assert slices[0][0] == 0
    assert slices[-1][1] == batch_rows
    for (_, hi), (lo, _) in itertools.pairwise(slices):
        assert hi == lo


@FAST
@given(plans(), worlds_st)
def test_rank_batch_sizes_are_balanced(plan: EpochPlan, world: int) -> None:
    for s in plan.steps():
        sizes = [len(plan.rank_batch(s, world, r)) for r in range(world)]
        assert sum(sizes) == plan.batch_rows(s)
        assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize(("world", "rank"), [(1, 1), (4, 4), (4, -1), (0, 0)])
def test_rank_slice_rejects_ranks_outside_the_world(world: int, rank: int) -> None:
    with pytest.raises(ValueError, match="outside a world"):
        rank_slice(10, world, rank)


def test_small_batch_leaves_some_ranks_empty() -> None:
    plan = EpochPlan((3,), global_batch_size=3, shuffle=False)
    got = [plan.rank_batch(0, 5, r).tolist() for r in range(5)]
    assert list(itertools.chain.from_iterable(got)) == [0, 1, 2]
    assert sorted(len(g) for g in got) == [0, 0, 1, 1, 1]


# -- exact resume -----------------------------------------------------------------------------------------


@FAST
@given(plans(), st.data())
def test_resume_from_any_step_replays_the_remaining_suffix(plan: EpochPlan, data: st.DataObject) -> None:
    uninterrupted = all_batches(plan)
    assert list(plan.steps()) == list(range(plan.num_steps))
    start = data.draw(st.integers(0, plan.num_steps), label="resume step")
    pos = Position(epoch=plan.epoch, step=start)

    # A restarted process rebuilds the plan from the checkpointed position.
    resumed_plan = replace(plan, epoch=pos.epoch)
    resumed_steps = list(resumed_plan.steps(pos.step))
    assert resumed_steps == list(range(start, plan.num_steps))
    resumed = [resumed_plan.global_batch(s) for s in resumed_steps]
    assert len(resumed) == len(uninterrupted) - start
    for got, want in zip(resumed, uninterrupted[start:], strict=True):
        np.testing.assert_array_equal(got, want)

    # ...and possibly on a different world: the rows are still those of the uninterrupted run.
    world = data.draw(worlds_st, label="world after resume")
    for s in resumed_steps:
        got = concat([resumed_plan.rank_batch(s, world, r) for r in range(world)])
        np.testing.assert_array_equal(got, uninterrupted[s])

    # Before + after the interruption = the epoch, each row once.
    done = concat(uninterrupted[:start] + resumed)
    np.testing.assert_array_equal(done, concat(uninterrupted))


def test_position_defaults_and_equality() -> None:
    assert Position() == Position(0, 0)
    assert Position(2, 5) == Position(epoch=2, step=5)
    assert Position(2, 5) != Position(2, 6)
    assert Position(2, 5, 320) != Position(2, 5, 310)
    assert Position().row == 0


@FAST
@given(plans())
def test_batch_bounds_outside_the_epoch_raise(plan: EpochPlan) -> None:
    for step in (-1, plan.num_steps, plan.num_steps + 7):
        with pytest.raises(IndexError):
            plan.batch_bounds(step)


# -- a global batch that changes mid-epoch (elastic runs with --batch-per-rank) ---------------------------


@st.composite
def world_changes(draw: st.DrawFn) -> list[tuple[int, int]]:
    """(world size, steps trained before the next change) for each world an epoch sees."""
    return draw(st.lists(st.tuples(worlds_st, st.integers(0, 12)), min_size=1, max_size=8))


def train_with_world_changes(base: EpochPlan, per_rank: int, changes: list[tuple[int, int]]
                             ) -> tuple[list[np.ndarray], list[int], Position]:
    """Train ``base``'s epoch with global batch ``per_rank x world``, the world changing as ``changes``
    says (the last world finishes the epoch), each new world's plan starting where training stands.

    Returns the global batches as the ranks trained them (rank slices concatenated), the batch size
    each was cut with, and the final position.
    """
    pos = Position(base.epoch)
    batches, sizes = [], []
    for i, (world, steps) in enumerate(changes):
        plan = EpochPlan.at(pos, base.partition_sizes, per_rank * world, base.seed, base.shuffle,
                            base.shuffle_window, base.drop_last)
        assert plan.start_step == pos.step and plan.start_row == pos.row
        last = i == len(changes) - 1
        for step in itertools.islice(plan.steps(pos.step), None if last else steps):
            batches.append(concat([plan.rank_batch(step, world, r) for r in range(world)]))
            sizes.append(plan.global_batch_size)
            pos = plan.position_after(step)
            assert pos.step == step + 1
    return batches, sizes, pos


@SLOW
@given(plans(drop_last=False, max_steps=24), st.integers(1, 40), world_changes())
def test_per_rank_batch_with_world_changes_trains_every_row_once(
        base: EpochPlan, per_rank: int, changes: list[tuple[int, int]]) -> None:
    batches, sizes, pos = train_with_world_changes(base, per_rank, changes)
    n = base.num_rows
    # The epoch's own order, every row once, whatever the cuts: nothing padded, nothing skipped.
    np.testing.assert_array_equal(concat(batches), base.order(0, n))
    assert pos == Position(base.epoch, len(batches), n)
    # Every batch is full at the size of its world, but possibly the epoch's last one.
    assert all(len(b) == size for b, size in zip(batches[:-1], sizes, strict=False))
    assert all(0 < len(b) <= size for b, size in zip(batches, sizes, strict=True))


@SLOW
@given(plans(drop_last=True, max_steps=24), st.integers(1, 40), world_changes())
def test_per_rank_batch_with_world_changes_and_drop_last_drops_only_the_tail(
        base: EpochPlan, per_rank: int, changes: list[tuple[int, int]]) -> None:
    batches, sizes, pos = train_with_world_changes(base, per_rank, changes)
    trained = concat(batches)
    # A prefix of the epoch's order, each row once, every batch full; the rest is less than one batch
    # of the last world.
    np.testing.assert_array_equal(trained, base.order(0, len(trained)))
    assert all(len(b) == size for b, size in zip(batches, sizes, strict=True))
    assert pos.row == len(trained)
    assert base.num_rows - len(trained) < per_rank * changes[-1][0]


@FAST
@given(plans(), st.data())
def test_a_plan_started_at_a_batch_boundary_is_the_plain_plan(plan: EpochPlan, data: st.DataObject) -> None:
    # The default path: with a fixed global batch, the position's row is step x batch, and the plan
    # rebuilt from it cuts exactly the plain plan's batches (so resumed runs are unchanged).
    b = plan.global_batch_size
    step = data.draw(st.integers(0, plan.num_steps), label="step")
    pos = Position(plan.epoch, step, min(step * b, plan.num_rows))
    resumed = EpochPlan.at(pos, plan.partition_sizes, b, plan.seed, plan.shuffle, plan.shuffle_window,
                           plan.drop_last)
    assert resumed.num_steps == plan.num_steps
    assert list(resumed.steps()) == list(plan.steps(step))
    world = data.draw(worlds_st, label="world")
    for s in resumed.steps():
        assert resumed.batch_bounds(s) == plan.batch_bounds(s)
        for r in range(world):
            np.testing.assert_array_equal(resumed.rank_batch(s, world, r), plan.rank_batch(s, world, r))
        assert resumed.position_after(s) == plan.position_after(s) == Position(plan.epoch, s + 1,
                                                                                 min((s + 1) * b, plan.num_rows))


def test_plan_started_mid_epoch_examples() -> None:
    plan = EpochPlan((10,), global_batch_size=4, shuffle=False, start_step=3, start_row=5)
    assert plan.num_steps == 5  # 3 steps before, then rows 5..8 and 9
    assert list(plan.steps()) == [3, 4]
    assert [plan.global_batch(s).tolist() for s in plan.steps()] == [[5, 6, 7, 8], [9]]
    assert plan.position_after(4) == Position(0, 5, 10)
    dropping = EpochPlan((10,), global_batch_size=4, shuffle=False, drop_last=True, start_step=3, start_row=5)
    assert list(dropping.steps()) == [3]
    done = EpochPlan((10,), global_batch_size=4, start_step=7, start_row=10)
    assert done.num_steps == 7 and list(done.steps()) == []
    with pytest.raises(IndexError):
        plan.batch_bounds(2)
    with pytest.raises(ValueError, match="before this plan's first step"):
        plan.steps(2)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"start_step": -1}, "start_step"), ({"start_row": -1}, "start_row"), ({"start_row": 8}, "start_row")],
)
def test_plan_start_outside_the_epoch_raises(kwargs: dict[str, int], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        EpochPlan((3, 4), 2, **kwargs)  # type: ignore[arg-type]


# -- determinism and shuffling ----------------------------------------------------------------------------


@FAST
@given(plans())
def test_same_inputs_give_the_same_order(plan: EpochPlan) -> None:
    again = replace(plan)
    np.testing.assert_array_equal(again.partition_order, plan.partition_order)
    np.testing.assert_array_equal(again.order(0, again.num_rows), plan.order(0, plan.num_rows))
    for s in plan.steps():
        np.testing.assert_array_equal(again.global_batch(s), plan.global_batch(s))
    # Repeated calls on one object are stable too.
    np.testing.assert_array_equal(plan.order(0, plan.num_rows), plan.order(0, plan.num_rows))


@FAST
@given(plans(shuffle=True), st.integers(1, 1000))
def test_another_epoch_or_seed_gives_another_order(plan: EpochPlan, delta: int) -> None:
    # With >= 20 rows there are at least ~1e8 possible orders: equal orders mean the inputs are ignored.
    assume(plan.num_rows >= 20)
    n = plan.num_rows
    base = plan.order(0, n)
    next_epoch = replace(plan, epoch=plan.epoch + delta).order(0, n)
    other_seed = replace(plan, seed=(plan.seed + delta) % 2**32).order(0, n)
    assert not np.array_equal(base, next_epoch)
    assert not np.array_equal(base, other_seed)
    # Still a permutation of the same rows.
    np.testing.assert_array_equal(np.sort(next_epoch), np.arange(n))
    if len(plan.partition_sizes) >= 12:  # 12! orders: partition order itself is reshuffled
        assert not np.array_equal(plan.partition_order, replace(plan, epoch=plan.epoch + delta).partition_order)
        assert not np.array_equal(
            plan.partition_order, replace(plan, seed=(plan.seed + delta) % 2**32).partition_order
        )


def test_partition_order_changes_every_epoch() -> None:
    orders = {
        tuple(EpochPlan(tuple(range(1, 11)), 8, seed=5, epoch=e).partition_order.tolist()) for e in range(20)
    }
    assert len(orders) >= 18
    assert all(sorted(o) == list(range(10)) for o in orders)


@FAST
@given(plans(shuffle=False))
def test_no_shuffle_is_the_identity_order(plan: EpochPlan) -> None:
    n = plan.num_rows
    np.testing.assert_array_equal(plan.partition_order, np.arange(len(plan.partition_sizes)))
    np.testing.assert_array_equal(plan.order(0, n), np.arange(n))
    # Independent of seed and epoch.
    other = replace(plan, seed=plan.seed + 1, epoch=plan.epoch + 1)
    np.testing.assert_array_equal(other.order(0, n), np.arange(n))
    for s in plan.steps():
        lo, hi = plan.batch_bounds(s)
        np.testing.assert_array_equal(plan.global_batch(s), np.arange(lo, hi))


def test_shuffle_actually_permutes() -> None:
    plan = EpochPlan(tuple([50] * 8), global_batch_size=32, seed=3, epoch=1, shuffle=True, shuffle_window=2)
    order = plan.order(0, plan.num_rows)
    assert not np.array_equal(order, np.arange(plan.num_rows))
    assert not np.array_equal(plan.partition_order, np.arange(8))


# -- bounded shuffle windows ------------------------------------------------------------------------------


@FAST
@given(plans())
def test_each_window_only_holds_rows_of_its_partitions(plan: EpochPlan) -> None:
    num_parts = len(plan.partition_sizes)
    np.testing.assert_array_equal(np.sort(plan.partition_order), np.arange(num_parts))
    assert plan.num_windows == math.ceil(num_parts / plan.shuffle_window)

    seen_parts: list[int] = []
    pieces = []
    for w in range(plan.num_windows):
        parts = plan.window_partitions(w)
        assert 1 <= len(parts) <= plan.shuffle_window
        np.testing.assert_array_equal(parts, plan.partition_order[w * plan.shuffle_window:][: len(parts)])
        seen_parts.extend(parts.tolist())
        rows = plan.window_positions(w)
        expected = concat([np.arange(plan.offsets[p], plan.offsets[p + 1]) for p in parts])
        # Exactly the rows of the window's partitions, each once.
        np.testing.assert_array_equal(np.sort(rows), np.sort(expected))
        if len(rows):
            part_of_row, _ = plan.locate(rows)
            assert set(part_of_row.tolist()) <= set(parts.tolist())
        pieces.append(rows)
    assert sorted(seen_parts) == list(range(num_parts))
    # The epoch order is the windows one after the other.
    np.testing.assert_array_equal(concat(pieces), plan.order(0, plan.num_rows))


@FAST
@given(plans(), st.data())
def test_windows_between_covers_the_rows_of_a_range(plan: EpochPlan, data: st.DataObject) -> None:
    n = plan.num_rows
    start = data.draw(st.integers(0, n), label="start")
    stop = data.draw(st.integers(start, n + 2), label="stop")
    windows = plan.windows_between(start, stop)
    rows = plan.order(start, stop)
    if len(rows) == 0:
        assert len(windows) == 0
        return
    allowed = {int(p) for w in windows for p in plan.window_partitions(w)}
    part_of_row, _ = plan.locate(rows)
    assert set(part_of_row.tolist()) <= allowed
    # Tight: the first and last window both contribute rows.
    first_parts = set(plan.window_partitions(windows[0]).tolist())
    last_parts = set(plan.window_partitions(windows[-1]).tolist())
    assert first_parts & set(part_of_row.tolist())
    assert last_parts & set(part_of_row.tolist())


# -- positions to partitions ------------------------------------------------------------------------------


@FAST
@given(plans(), st.data())
def test_locate_matches_brute_force(plan: EpochPlan, data: st.DataObject) -> None:
    n = plan.num_rows
    assume(n > 0)
    positions = np.asarray(
        data.draw(st.lists(st.integers(0, n - 1), max_size=60), label="positions"), dtype=np.int64
    )
    part, local = plan.locate(positions)
    assert len(part) == len(local) == len(positions)
    for pos, p, i in zip(positions.tolist(), part.tolist(), local.tolist(), strict=True):
        assert p == owner(plan, pos)
        assert 0 <= i < plan.partition_sizes[p]
        assert plan.offsets[p] + i == pos
    # Every row of every partition maps back to itself.
    all_part, all_local = plan.locate(np.arange(n))
    expected_part = np.repeat(np.arange(len(plan.partition_sizes)), plan.partition_sizes)
    np.testing.assert_array_equal(all_part, expected_part)
    np.testing.assert_array_equal(plan.offsets[all_part] + all_local, np.arange(n))


@FAST
@given(plans(), worlds_st, st.data())
def test_group_by_partition_round_trips(plan: EpochPlan, world: int, data: st.DataObject) -> None:
    assume(plan.num_steps > 0)
    step = data.draw(st.integers(0, plan.num_steps - 1), label="step")
    rank = data.draw(st.integers(0, world - 1), label="rank")
    for positions in (plan.rank_batch(step, world, rank), plan.global_batch(step)):
        groups = group_by_partition(plan, positions)
        parts = [p for p, _, _ in groups]
        assert len(parts) == len(set(parts)), "one request per partition"
        assert all(isinstance(p, int) for p in parts)
        rebuilt = np.full(len(positions), -1, dtype=np.int64)
        covered = concat([idx for _, _, idx in groups])
        np.testing.assert_array_equal(np.sort(covered), np.arange(len(positions)))
        for p, local, idx in groups:
            assert len(local) == len(idx) > 0
            assert np.all((local >= 0) & (local < plan.partition_sizes[p]))
            rebuilt[idx] = plan.offsets[p] + local
        np.testing.assert_array_equal(rebuilt, positions)


def test_group_by_partition_examples() -> None:
    plan = EpochPlan((3, 0, 2, 4), global_batch_size=4, shuffle=False)
    # offsets: 0, 3, 3, 5, 9
    positions = np.array([8, 0, 3, 2, 5, 4])
    groups = group_by_partition(plan, positions)
    as_lists = [(p, local.tolist(), idx.tolist()) for p, local, idx in groups]
    assert as_lists == [(0, [0, 2], [1, 3]), (2, [0, 1], [2, 5]), (3, [3, 0], [0, 4])]
    assert group_by_partition(plan, np.empty(0, dtype=np.int64)) == []


def test_locate_skips_empty_partitions() -> None:
    plan = EpochPlan((0, 2, 0, 0, 1, 0), global_batch_size=1, shuffle=False)
    part, local = plan.locate(np.array([0, 1, 2]))
    assert part.tolist() == [1, 1, 4]
    assert local.tolist() == [0, 1, 0]


# -- degenerate layouts and validation --------------------------------------------------------------------


@pytest.mark.parametrize("sizes", [(), (0,), (0, 0, 0)])
def test_empty_dataset_has_no_steps(sizes: tuple[int, ...]) -> None:
    plan = EpochPlan(sizes, global_batch_size=4)
    assert plan.num_rows == 0
    assert plan.num_steps == 0
    assert list(plan.steps()) == []
    assert len(plan.order(0, 10)) == 0


def test_partition_sizes_are_normalised_to_ints() -> None:
    plan = EpochPlan([np.int64(3), 2.0], global_batch_size=2)  # type: ignore[arg-type]
    assert plan.partition_sizes == (3, 2)
    assert all(type(s) is int for s in plan.partition_sizes)
    assert plan.num_rows == 5


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"global_batch_size": 0}, "global_batch_size"),
        ({"global_batch_size": -3}, "global_batch_size"),
        ({"shuffle_window": 0}, "shuffle_window"),
        ({"shuffle_window": -1}, "shuffle_window"),
        ({"partition_sizes": (3, -1, 2)}, "partition sizes"),
    ],
)
def test_invalid_plans_raise_value_error(kwargs: dict[str, object], match: str) -> None:
    params: dict[str, object] = {"partition_sizes": (3, 4), "global_batch_size": 2}
    params.update(kwargs)
    with pytest.raises(ValueError, match=match):
        EpochPlan(**params)  # type: ignore[arg-type]


@pytest.mark.parametrize(("rows", "world"), [(0, 1), (1, 2), (7, 8)])
def test_validate_world_refuses_more_ranks_than_rows(rows: int, world: int) -> None:
    with pytest.raises(ValueError, match=f"{rows} rows but the world has {world} ranks"):
        validate_world(rows, world)


@pytest.mark.parametrize(("rows", "world"), [(1, 1), (8, 8), (100, 3)])
def test_validate_world_accepts_enough_rows(rows: int, world: int) -> None:
    validate_world(rows, world)
