"""Epoch plan: which rows every rank trains on at every step. Pure logic, no I/O.

The plan is a function of ``(seed, epoch, partition sizes, global batch size)`` and of nothing about the
world: the global order of rows, and so the sequence of global batches, is the same for 1 rank or 64.
A world of ``n`` ranks only decides how each global batch is cut into ``n`` contiguous slices.
The global batch size only decides where the order is cut into batches, so a plan can also start
mid-epoch (``start_row``): the rest of the epoch, cut into batches of another size. That is how an
elastic run with ``--batch-per-rank`` (global batch = per-rank batch x ranks) goes on after a world
change: from the first row of the epoch's order not yet trained, whatever batch size trained the rest.

Rows are named by their *position*: partition ``p``'s row ``i`` has position ``offsets[p] + i``.

Shuffling follows the block-shuffle idea of MosaicML streaming: the partitions are permuted, grouped
into windows of ``shuffle_window`` consecutive (permuted) partitions, and the rows inside each window
are permuted. A rank therefore only ever needs the partitions of one or two windows at a time, and the
plan never materialises an index of the whole dataset: a window's permutation is derived from
``(seed, epoch, window)`` on demand.
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property

import numpy as np


@dataclass(frozen=True)
class Position:
    """Where training stands: the next global step to run is ``step`` of ``epoch`` and begins at ``row``.

    ``row`` is the index, in the epoch's global order, of the first row not yet trained: the position
    that survives a change of the global batch size, since the order does not depend on it. ``step``
    counts the epoch's steps so far (for logs and the audit). With a fixed global batch ``B``,
    ``row == step * B``.
    """

    epoch: int = 0
    step: int = 0
    row: int = 0


def rank_slice(batch_rows: int, world_size: int, rank: int) -> tuple[int, int]:
    """The ``[start, stop)`` slice of a global batch of ``batch_rows`` rows that ``rank`` trains on.

    Slices differ in length by at most one row; a rank may get none when the batch has fewer rows
    than there are ranks (it still takes part in the allreduce, with zero gradients).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a world of size {world_size}")
    return rank * batch_rows // world_size, (rank + 1) * batch_rows // world_size


@dataclass(frozen=True)
class EpochPlan:
    """The global order of one epoch and its cut into global batches.

    A plan may start mid-epoch: its steps ``start_step, start_step + 1, ...`` cut the rows from
    ``start_row`` on into batches of ``global_batch_size``; the rows before ``start_row`` were trained
    in the epoch's first ``start_step`` steps, possibly with other batch sizes. ``drop_last`` drops
    the last partial batch of what the plan covers.
    """

    partition_sizes: tuple[int, ...]
    global_batch_size: int
    seed: int = 0
    epoch: int = 0
    shuffle: bool = True
    shuffle_window: int = 4
    drop_last: bool = False
    start_step: int = 0
    start_row: int = 0
    # Train only the first ``max_rows`` rows of the epoch's order (``--max-samples``): the batch that
    # reaches it is cut short, whatever ``drop_last`` says (it is about the natural end of the epoch).
    max_rows: int | None = None

    def __post_init__(self) -> None:
        if self.global_batch_size < 1:
            raise ValueError(f"global_batch_size must be >= 1, got {self.global_batch_size}")
        if self.shuffle_window < 1:
            raise ValueError(f"shuffle_window must be >= 1, got {self.shuffle_window}")
        if any(s < 0 for s in self.partition_sizes):
            raise ValueError("partition sizes must be >= 0")
        if self.max_rows is not None and self.max_rows < 0:
            raise ValueError(f"max_rows must be >= 0, got {self.max_rows}")
        object.__setattr__(self, "partition_sizes", tuple(int(s) for s in self.partition_sizes))
        if self.start_step < 0:
            raise ValueError(f"start_step must be >= 0, got {self.start_step}")
        if not 0 <= self.start_row <= self.num_rows:
            raise ValueError(f"start_row must be within the epoch's {self.num_rows} rows, got {self.start_row}")

    @classmethod
    def at(cls, position: Position, partition_sizes: tuple[int, ...], global_batch_size: int, seed: int = 0,
           shuffle: bool = True, shuffle_window: int = 4, drop_last: bool = False) -> EpochPlan:
        """The rest of ``position``'s epoch, from its next step on, in batches of ``global_batch_size``."""
        return cls(partition_sizes, global_batch_size, seed, position.epoch, shuffle, shuffle_window, drop_last,
                   position.step, position.row)

    # -- the global order ---------------------------------------------------------------------------

    @property
    def num_rows(self) -> int:
        """Rows in the epoch's order (at most ``max_rows``)."""
        total = sum(self.partition_sizes)
        return total if self.max_rows is None else min(total, self.max_rows)

    @property
    def cut(self) -> bool:
        """Whether ``max_rows`` ends the epoch before its natural end."""
        return self.max_rows is not None and self.max_rows < sum(self.partition_sizes)

    @cached_property
    def offsets(self) -> np.ndarray:
        """Position of each partition's first row (length ``P + 1``, last entry = number of rows)."""
        return np.concatenate([[0], np.cumsum(self.partition_sizes, dtype=np.int64)]).astype(np.int64)

    @cached_property
    def partition_order(self) -> np.ndarray:
        order = np.arange(len(self.partition_sizes), dtype=np.int64)
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch, 0]).permutation(order)
        return order

    @cached_property
    def _window_starts(self) -> list[int]:
        """Global order index at which each window begins (plus the end)."""
        sizes = np.asarray(self.partition_sizes, dtype=np.int64)[self.partition_order]
        starts = [0]
        for w in range(0, len(sizes), self.shuffle_window):
            starts.append(starts[-1] + int(sizes[w : w + self.shuffle_window].sum()))
        return starts

    @property
    def num_windows(self) -> int:
        return len(self._window_starts) - 1

    def window_partitions(self, window: int) -> np.ndarray:
        """The partitions (in plan order) that make up ``window``."""
        return self.partition_order[window * self.shuffle_window : (window + 1) * self.shuffle_window]

    @cached_property
    def _recent_windows(self) -> dict[int, np.ndarray]:
        return {}

    def window_positions(self, window: int) -> np.ndarray:
        """Row positions of ``window`` in the order they are trained (read-only).

        Consecutive steps read the same window, so the last two permutations are kept; older ones are
        dropped and recomputed on demand, keeping the plan's memory at two windows.
        """
        cache = self._recent_windows
        if window not in cache:
            if len(cache) >= 2:
                cache.pop(next(iter(cache)))
            cache[window] = self._permute_window(window)
        return cache[window]

    def _permute_window(self, window: int) -> np.ndarray:
        parts = self.window_partitions(window)
        rows = np.concatenate(
            [np.arange(self.offsets[p], self.offsets[p + 1], dtype=np.int64) for p in parts]
            or [np.empty(0, dtype=np.int64)]
        )
        if self.shuffle:
            rows = np.random.default_rng([self.seed, self.epoch, 1, window]).permutation(rows)
        rows.flags.writeable = False
        return rows

    def order(self, start: int, stop: int) -> np.ndarray:
        """Row positions at global order indexes ``[start, stop)``."""
        stop = min(stop, self.num_rows)
        if start >= stop:
            return np.empty(0, dtype=np.int64)
        first = bisect.bisect_right(self._window_starts, start) - 1
        last = bisect.bisect_right(self._window_starts, stop - 1) - 1
        pieces = []
        for w in range(first, last + 1):
            w0 = self._window_starts[w]
            rows = self.window_positions(w)
            pieces.append(rows[max(start - w0, 0) : stop - w0])
        return np.concatenate(pieces)

    def windows_between(self, start: int, stop: int) -> range:
        """Windows touched by global order indexes ``[start, stop)``."""
        if start >= stop:
            return range(0)
        first = bisect.bisect_right(self._window_starts, start) - 1
        last = bisect.bisect_right(self._window_starts, min(stop, self.num_rows) - 1) - 1
        return range(first, last + 1)

    # -- global batches -----------------------------------------------------------------------------

    @property
    def num_steps(self) -> int:
        """Steps of the epoch: ``start_step`` before this plan, then this plan's."""
        full, rest = divmod(self.num_rows - self.start_row, self.global_batch_size)
        return self.start_step + full + (1 if rest and (self.cut or not self.drop_last) else 0)

    @property
    def trained_rows(self) -> int:
        """Rows this plan's steps train, from ``start_row`` on (``drop_last`` leaves a short tail out)."""
        steps = self.num_steps - self.start_step
        return min(self.num_rows, self.start_row + steps * self.global_batch_size) - self.start_row

    def batch_bounds(self, step: int) -> tuple[int, int]:
        """Global order indexes ``[start, stop)`` of the global batch at ``step``."""
        if not self.start_step <= step < self.num_steps:
            raise IndexError(f"step {step} outside steps {self.start_step}..{self.num_steps - 1} of the epoch")
        start = self.start_row + (step - self.start_step) * self.global_batch_size
        return start, min(start + self.global_batch_size, self.num_rows)

    def position_after(self, step: int) -> Position:
        """Where training stands once ``step`` has been trained."""
        return Position(self.epoch, step + 1, self.batch_bounds(step)[1])

    def batch_rows(self, step: int) -> int:
        start, stop = self.batch_bounds(step)
        return stop - start

    def global_batch(self, step: int) -> np.ndarray:
        return self.order(*self.batch_bounds(step))

    def rank_batch(self, step: int, world_size: int, rank: int) -> np.ndarray:
        """Row positions ``rank`` trains on at ``step`` in a world of ``world_size`` ranks."""
        start, stop = self.batch_bounds(step)
        lo, hi = rank_slice(stop - start, world_size, rank)
        return self.order(start + lo, start + hi)

    def steps(self, start_step: int | None = None) -> Iterator[int]:
        """This plan's steps from ``start_step`` (default: its first) on."""
        start = self.start_step if start_step is None else start_step
        if start < self.start_step:
            raise ValueError(f"step {start} is before this plan's first step {self.start_step}")
        return iter(range(start, self.num_steps))

    # -- positions to partitions --------------------------------------------------------------------

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Split row positions into (partition, row within partition)."""
        part = np.searchsorted(self.offsets, positions, side="right") - 1
        return part, positions - self.offsets[part]


def group_by_partition(
    plan: EpochPlan, positions: np.ndarray
) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """Group row positions by partition: ``(partition, rows within it, indexes into positions)``.

    The stream asks each partition for its rows in one request and puts them back in plan order
    with the indexes.
    """
    part, local = plan.locate(positions)
    if not len(part):
        return []
    # A request's positions fall in a window or two: few partitions, numbered close together. Counted
    # from the first, they sort stably by radix sort as 16-bit integers, 2.5x faster than as int64.
    first = int(part.min())
    rel = part - first
    counts = np.bincount(rel)
    order = np.argsort(rel.astype(np.uint16) if len(counts) <= 1 << 16 else rel, kind="stable")
    ends = np.cumsum(counts)
    groups = []
    for r in np.flatnonzero(counts):
        idx = order[ends[r] - counts[r] : ends[r]]
        groups.append((first + int(r), local[idx], idx))
    return groups


def limited(plan: EpochPlan, samples_left: int | None) -> EpochPlan:
    """``plan`` cut so that its steps (from its first, ``start_row`` on) train at most ``samples_left`` rows."""
    if samples_left is None or samples_left >= plan.trained_rows:
        return plan
    return dataclasses.replace(plan, max_rows=plan.start_row + max(samples_left, 0))


def steps_for_samples(plan: EpochPlan, epochs: int, samples: int | None) -> int:
    """Steps that ``epochs`` epochs shaped like ``plan`` take to train ``samples`` rows (all of them if None)."""
    per_epoch = plan.trained_rows
    if samples is None or per_epoch == 0 or samples >= epochs * per_epoch:
        return epochs * plan.num_steps
    full, rest = divmod(samples, per_epoch)
    return full * plan.num_steps + -(-rest // plan.global_batch_size)


def validate_world(num_rows: int, world_size: int) -> None:
    """Refuse worlds larger than the data: some rank would never see a row."""
    if num_rows < world_size:
        raise ValueError(
            f"the training split has {num_rows} rows but the world has {world_size} ranks; "
            "use more data or fewer ranks"
        )

