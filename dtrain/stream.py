"""Stream a rank's rows from the Dask cluster, following the epoch plan. Thin I/O over ``dtrain.plan``.

The index goes to the data, not the data to the index: for each partition a request needs, the rank
submits one small task that runs where the prepared partition lives and returns just the requested
rows. Requests cover ``chunk`` steps at once (few tasks for the scheduler) and at most ``prefetch``
steps are in flight, so a rank holds O(prefetch x per-rank batch) rows whatever the dataset size.
Futures are released as soon as their rows are handed over; a partition stays on the cluster only
while some rank still has a request on it.

Dask's client computes futures in the background on its own thread, so loading overlaps training
without a thread of ours; the loop only blocks when it outruns the prefetch window.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from dask.delayed import Delayed
from distributed import Client, Future

from dtrain.data import Arrays, take_rows
from dtrain.plan import EpochPlan, group_by_partition

log = logging.getLogger(__name__)


@dataclass
class Batch:
    """One rank's share of one global batch."""

    epoch: int
    step: int
    x: torch.Tensor
    y: torch.Tensor
    row_id: np.ndarray
    global_rows: int  # rows in the whole global batch: each rank's loss is a sum divided by this

    @property
    def rows(self) -> int:
        return len(self.row_id)


@dataclass
class _Request:
    steps: list[int]
    lengths: list[int]  # this rank's rows per step
    global_rows: list[int]
    total: int
    takes: list[tuple[Future, np.ndarray]]  # (future of Arrays, where its rows go)
    partitions: set[int]


class Stream:
    """Batches for one rank, from one split's prepared partitions."""

    def __init__(self, client: Client, partitions: list[Delayed], num_features: int, rank: int,
                 world_size: int, prefetch: int = 8, device: torch.device | None = None):
        self.client = client
        self.partitions = partitions
        self.num_features = num_features
        self.rank = rank
        self.world_size = world_size
        self.prefetch = max(1, prefetch)
        # Two requests in flight, each covering half the prefetch window.
        self.chunk = max(1, self.prefetch // 2)
        self.device = device or torch.device("cpu")
        self._held: dict[int, Future] = {}

    def _partition(self, p: int) -> Future:
        if p not in self._held:
            # Same key on every rank: the cluster loads each partition once for all of them.
            self._held[p] = self.client.compute(self.partitions[p])
        return self._held[p]

    def _submit(self, plan: EpochPlan, steps: list[int]) -> _Request:
        per_step = [plan.rank_batch(s, self.world_size, self.rank) for s in steps]
        positions = np.concatenate(per_step) if per_step else np.empty(0, dtype=np.int64)
        takes, parts = [], set()
        for p, local, idx in group_by_partition(plan, positions):
            fut = self.client.submit(take_rows, self._partition(p), local, pure=False)
            takes.append((fut, idx))
            parts.add(p)
        return _Request(steps, [len(b) for b in per_step], [plan.batch_rows(s) for s in steps],
                        len(positions), takes, parts)

    def _gather(self, req: _Request, y_dtype: np.dtype) -> Arrays:
        x = np.empty((req.total, self.num_features), dtype=np.float32)
        y = np.empty(req.total, dtype=y_dtype)
        rid = np.empty(req.total, dtype=np.int64)
        for fut, idx in req.takes:
            part: Arrays = fut.result()
            x[idx], y[idx], rid[idx] = part.x, part.y, part.row_id
            fut.release()
        return Arrays(x, y, rid)

    def _release_unused(self, pending: collections.deque[_Request]) -> None:
        needed = set().union(*(r.partitions for r in pending)) if pending else set()
        for p in list(self._held):
            if p not in needed:
                self._held.pop(p).release()

    def batches(self, plan: EpochPlan, start_step: int = 0, y_dtype: np.dtype | None = None) -> Iterator[Batch]:
        """This rank's batches of ``plan`` from ``start_step`` on, in step order."""
        y_dtype = y_dtype or np.dtype(np.int64)
        steps = list(plan.steps(start_step))
        chunks = [steps[i : i + self.chunk] for i in range(0, len(steps), self.chunk)]
        pending: collections.deque[_Request] = collections.deque()
        try:
            for c in chunks[:2]:
                pending.append(self._submit(plan, c))
            next_chunk = 2
            while pending:
                req = pending.popleft()
                if next_chunk < len(chunks):
                    pending.append(self._submit(plan, chunks[next_chunk]))
                    next_chunk += 1
                rows = self._gather(req, y_dtype)
                self._release_unused(pending)
                x = torch.from_numpy(rows.x)
                y = torch.from_numpy(rows.y)
                if self.device.type == "cuda":
                    x, y = x.pin_memory(), y.pin_memory()
                start = 0
                for step, n, g in zip(req.steps, req.lengths, req.global_rows, strict=True):
                    sl = slice(start, start + n)
                    start += n
                    yield Batch(plan.epoch, step, x[sl].to(self.device, non_blocking=True),
                                y[sl].to(self.device, non_blocking=True), rows.row_id[sl], g)
        finally:
            for req in pending:
                for fut, _ in req.takes:
                    fut.release()
            self._release_unused(collections.deque())
