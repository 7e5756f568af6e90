"""Stream a rank's rows from the Dask cluster, following the epoch plan. Thin I/O over ``dtrain.data.plan``.

The index goes to the data, not the data to the index: the rank sends the row indexes of a request to
the workers holding the prepared partitions, and each returns just the requested rows. Every task
costs milliseconds of Dask round trips and bookkeeping whatever its size, so tasks are few and large:

* each partition has a home worker (``partition % workers``, the same on every rank) where it is
  prepared, and a request sends *one* task per home worker, taking the rows of all that worker's
  partitions at once. (One task per partition made a request 1.7x slower with 4 partitions in it and
  5.7x with 16, on 2 cores; see benchmarks/stream_bench.py for the whole stream.)
* a request covers ``prefetch / 2`` consecutive steps, and at most two requests are alive, so a rank
  holds at most ``prefetch`` steps of rows whatever the dataset size: the one trained on and the next,
  loading. By default ``prefetch`` is sized in bytes (16 MB of rows per rank, :func:`auto_prefetch`):
  more, smaller requests measured slower, as the cost is per task. The first requests of a pass are
  smaller (:func:`ramped`), so that the first batch does not wait for a large one. Small requests
  (an explicit small ``prefetch``) pay latency, so up to two more are sent ahead (a few MB at most):
  their take tasks run on the workers and their rows wait there until the loader gathers them.
* the rows come straight from the worker that cut them, not relayed by the scheduler, which on an
  embedded cluster shares rank 0's process and its GIL.

Futures are released as soon as their rows are copied out. The cluster holds a partition while a
pending request reads it, or the next request will (prepared one request ahead, so that a new shuffle
window does not stall the rank): a few shuffle windows per rank.

Loading overlaps training twice over: the workers compute in the background of Dask's client, and a
thread of ours pulls the next request's rows into this process (the transfer and the copy happen at
gather time, not when the workers finish) while the loop trains on the current one. On a GPU, rows
land in pinned memory and are copied to the device asynchronously (``non_blocking``).
"""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import mmap
import os
from collections.abc import Callable, Generator
from dataclasses import dataclass

import numpy as np
import torch
from dask.delayed import Delayed
from distributed import Client, Future
from distributed.comm import CommClosedError

from dtrain.data.plan import EpochPlan, group_by_partition, rank_slice
from dtrain.data.prepare import Arrays, take_from
from dtrain.data.sources import read_errors

log = logging.getLogger(__name__)


# At most this many requests (and bytes of their rows) sent to the cluster ahead of the two alive: see
# Stream._sent_ahead.
SENT_AHEAD = 2
SENT_AHEAD_BYTES = 8 << 20
# Bytes of rows a rank keeps in flight when no ``prefetch`` is given: see Stream.steps_in_flight.
AUTO_PREFETCH_BYTES = 16 << 20
# The first request of a pass is this fraction of the others: see ramped().
RAMP_FIRST = 8


def _mapped(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An array in a memory mapping of its own, given back to the OS as soon as the array is freed.

    A request's rows are large and short-lived. From glibc's heaps (it serves blocks up to 32 MiB there
    once a large one was freed) they fragment: tests/test_stream_memory.py saw the resident memory of a
    rank grow 15-25 MB per epoch. Lowering glibc's mmap threshold for the whole process did the same
    for the stream, but made every large tensor of training a fresh mapping to fault in at every step:
    18% fewer samples/s for 2 ranks of the 2048-wide MLP on 2 cores.
    """
    count = int(np.prod(shape))
    # Private (Python's default is a shared mapping, whose pages cost more to fault in), and populated
    # by the kernel in one call rather than one fault per page: 6-8 ms against 11-12 to fill 8 MB.
    flags = mmap.MAP_PRIVATE | getattr(mmap, "MAP_POPULATE", 0)
    return np.frombuffer(mmap.mmap(-1, max(count * dtype.itemsize, 1), flags=flags), dtype=dtype,
                         count=count).reshape(shape)


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
    """The rows of ``steps`` for this rank, asked of the cluster as one take task per home worker."""

    steps: list[int]
    lengths: list[int]  # this rank's rows per step
    global_rows: list[int]
    total: int
    takes: list[tuple[Future, np.ndarray]]  # (future of Arrays from one worker, where its rows go)
    partitions: set[int]

    def release(self) -> None:
        for fut, _ in self.takes:
            fut.release()


@dataclass
class _Rows:
    x: torch.Tensor
    y: torch.Tensor
    row_id: np.ndarray


def _lost(loading: concurrent.futures.Future[_Rows]) -> bool:
    """Whether the next request failed because the cluster went away. Waited for at the current one's
    last step: a rank that has rows for a step can still vote to stop after it, with the others."""
    try:
        loading.result()
    except (concurrent.futures.CancelledError, CommClosedError):  # Dask's FutureCancelledError is one
        return True
    except Exception:  # any other failure is raised where the rows are taken, as before
        return False
    return False


def rank_positions(plan: EpochPlan, steps: list[int], world_size: int, rank: int) -> list[np.ndarray]:
    """``plan.rank_batch(s, world_size, rank)`` for consecutive ``steps``, reading the global order once.

    Per step, the plan would recompute the permutation of the shuffle window each time.
    """
    if not steps:
        return []
    begin, end = plan.batch_bounds(steps[0])[0], plan.batch_bounds(steps[-1])[1]
    order = plan.order(begin, end)
    out = []
    for s in steps:
        start, stop = plan.batch_bounds(s)
        lo, hi = rank_slice(stop - start, world_size, rank)
        out.append(order[start - begin + lo : start - begin + hi])
    return out


def row_bytes(num_features: int) -> int:
    """Bytes of one row on a rank: float32 features, the label (8 bytes at most) and the int64 row id."""
    return 4 * num_features + 16


def auto_prefetch(global_batch_size: int, world_size: int, num_features: int) -> int:
    """Steps of rows that make AUTO_PREFETCH_BYTES on one rank (at least 2: one request alive, one loading).

    A request costs Dask round trips worth milliseconds of CPU on the rank and the worker however few
    rows it carries, so requests are sized by bytes, not steps. Measured on 2 cores: a real 2-rank run
    (batch 128, 32 features) trained 1.4x the samples/s with 8 MB requests as with the 64 steps (290 kB)
    that were the default before, and waited for data 2% of its step time instead of 8%.
    """
    per_step = -(-global_batch_size // world_size) * row_bytes(num_features)
    return max(2, AUTO_PREFETCH_BYTES // per_step)


def ramped(steps: list[int], chunk: int, first: int) -> list[list[int]]:
    """``steps`` cut into requests of ``chunk`` steps, the first ones smaller: 1/first of it, doubling.

    The first batch waits for the whole first request (its partitions prepared, its rows cut and
    transferred); a small one arrives sooner, and the large ones load behind it while it trains.
    """
    out, size, i = [], max(1, chunk // first), 0
    while i < len(steps):
        out.append(steps[i : i + size])
        i += size
        size = min(chunk, 2 * size)
    return out


class Stream:
    """Batches for one rank, from one split's prepared partitions."""

    def __init__(self, client: Client, partitions: list[Delayed], num_features: int, rank: int,
                 world_size: int, prefetch: int | None = None, device: torch.device | None = None):
        self.client = client
        self.partitions = partitions
        self.num_features = num_features
        self.rank = rank
        self.world_size = world_size
        self.prefetch = prefetch  # steps in flight; None: AUTO_PREFETCH_BYTES of rows
        self.device = device or torch.device("cpu")
        # DTRAIN_PIN_MEMORY=0 turns pinning off, so that benchmarks/gpu_check.py can measure what it buys.
        self._pin = self.device.type == "cuda" and os.environ.get("DTRAIN_PIN_MEMORY", "1") != "0"
        self._held: dict[int, Future] = {}  # prepared partitions that pending requests read from
        self._workers: list[str] = []  # the cluster's workers when the current pass began
        self.max_held = 0  # the most partitions held at once (observability; tested)
        # The client lost the scheduler: the rows in hand are still trained, every rank votes after
        # them, and they wait for it together (dtrain/train/trainer.py) or stop with a checkpoint.
        self.lost = False
        self._client_log_level = logging.NOTSET  # distributed.client's, while the scheduler is lost
        # While a pass runs: submits again what it has in flight and not in hand (see resume).
        self._resubmit: Callable[[], int] | None = None
        # Rows straight from the worker that cut them (1.14x the samples/s on 2 cores), unless the user's
        # Dask config says otherwise (distributed.client.direct-to-workers: ranks that cannot reach the
        # workers' addresses, only the scheduler's).
        direct = getattr(client, "direct_to_workers", None)
        self._direct = True if direct is None else bool(direct)

    def lose(self) -> None:
        """The scheduler is gone: this rank votes to stop after the rows in hand (``lost``)."""
        if self.lost:
            return
        self.lost = True
        # The client retries the scheduler in the background and logs every failed try with its
        # traceback; dtrain reports the loss itself, in one line.
        logger = logging.getLogger("distributed.client")
        self._client_log_level = logger.level
        logger.setLevel(logging.CRITICAL)

    def resume(self, client: Client) -> int:
        """Carry on through ``client``, connected to the scheduler that came back; returns how many
        requests in flight were submitted again.

        A scheduler that comes back is a new one: it knows none of the tasks of the one that went, and
        the client cancelled their futures. So the pass running submits again each request whose rows
        are not in this process yet, and prepares its partitions again; rows in hand stay. Called by
        every rank once any lost the scheduler, since the others' futures went with it too.
        """
        self.client = client
        if self.lost:
            logging.getLogger("distributed.client").setLevel(self._client_log_level)
        self.lost = False
        # The workers that (re)joined: new homes. A rank that sees other ones than the rest costs only
        # locality, as homes are loose restrictions.
        self._workers = sorted(client.nthreads())
        for fut in self._held.values():
            fut.release()
        self._held.clear()
        return self._resubmit() if self._resubmit is not None else 0

    def _home(self, p: int) -> str | None:
        """The worker partition ``p`` is prepared on and read from; ``None`` leaves it to the scheduler."""
        return self._workers[p % len(self._workers)] if self._workers else None

    def _partition(self, p: int) -> Future:
        if p not in self._held:
            # Same key and home on every rank: the cluster prepares each partition once for all of them.
            # allow_other_workers: if the home worker is gone, another takes over (moving the data).
            home = self._home(p)
            self._held[p] = self.client.compute(self.partitions[p], workers=[home] if home else None,
                                                allow_other_workers=True)
            self.max_held = max(self.max_held, len(self._held))
        return self._held[p]

    def _submit(self, plan: EpochPlan, steps: list[int]) -> _Request:
        per_step = rank_positions(plan, steps, self.world_size, self.rank)
        positions = np.concatenate(per_step) if per_step else np.empty(0, dtype=np.int64)
        groups = group_by_partition(plan, positions)
        by_home: dict[str | None, list[tuple[int, np.ndarray, np.ndarray]]] = {}
        for g in groups:
            by_home.setdefault(self._home(g[0]), []).append(g)
        takes = []
        for home, group in by_home.items():
            # int32 row indexes: half the bytes to send, and to keep in Dask's logs of recent messages.
            parts, rows = [self._partition(p) for p, _, _ in group], [local.astype(np.int32) for _, local, _ in group]
            fut = self.client.submit(take_from, parts, rows, workers=[home] if home else None,
                                     allow_other_workers=True, pure=False)
            takes.append((fut, np.concatenate([idx for _, _, idx in group])))
        return _Request(steps, [len(b) for b in per_step], [plan.batch_rows(s) for s in steps],
                        len(positions), takes, {p for p, _, _ in groups})

    def _gather(self, req: _Request, y_dtype: np.dtype) -> _Rows:
        """Pull a request's rows into this process (on the loader thread), in plan order."""
        try:
            parts: list[Arrays] = self.client.gather([f for f, _ in req.takes], direct=self._direct)
            # Pinned host memory lets the copies to the GPU run asynchronously (non_blocking).
            if self._pin:
                x = torch.empty((req.total, self.num_features), dtype=torch.float32, pin_memory=True)
                y = torch.empty(req.total, dtype=torch.from_numpy(np.empty(0, dtype=y_dtype)).dtype, pin_memory=True)
            else:
                x = torch.from_numpy(_mapped((req.total, self.num_features), np.dtype(np.float32)))
                y = torch.from_numpy(_mapped((req.total,), y_dtype))
            rid = _mapped((req.total,), np.dtype(np.int64))
            xn, yn = x.numpy(), y.numpy()
            if len(parts) == 1:
                # One worker cut every row: take them into plan order (3-4x faster than the indexed
                # assignment below, 1.1 against 3-4 ms for 65k rows of 32 features).
                (part,), ((_, idx),) = parts, req.takes
                order = np.empty_like(idx)
                order[idx] = np.arange(len(idx))
                part.take_into(order, Arrays(xn, yn, rid))
            else:
                for part, (_, idx) in zip(parts, req.takes, strict=True):
                    xn[idx], yn[idx], rid[idx] = part.x, part.y, part.row_id
            return _Rows(x, y, rid)
        finally:
            req.release()

    def _warm(self, plan: EpochPlan, steps: list[int]) -> set[int]:
        """Start preparing the partitions of the windows ``steps`` read, a request ahead of their first use.

        Otherwise the first request on a new shuffle window waits for all of its partitions to be read
        and prepared, and the rank stalls at every window boundary.
        """
        if not steps:
            return set()
        begin, end = plan.batch_bounds(steps[0])[0], plan.batch_bounds(steps[-1])[1]
        parts = {int(p) for w in plan.windows_between(begin, end) for p in plan.window_partitions(w)}
        for p in parts:
            self._partition(p)
        return parts

    def steps_in_flight(self, plan: EpochPlan) -> int:
        """Steps of rows this rank keeps in flight: ``prefetch``, or :func:`auto_prefetch`'s choice."""
        if self.prefetch is not None:
            return max(1, self.prefetch)
        return auto_prefetch(plan.global_batch_size, self.world_size, self.num_features)

    def _sent_ahead(self, plan: EpochPlan, chunk: int) -> int:
        """Requests to send to the cluster beyond the two alive here, so that small ones overlap their latency.

        A take task spends ~10 ms in Dask round trips (client, scheduler, worker and back) however few rows
        it cuts, while the loader thread gathers one request at a time: with only the next request sent,
        the rank waits out that latency for every request. Tasks sent further ahead run meanwhile and
        their rows wait on the worker, not here, so this process still holds at most ``prefetch`` steps.
        Bounded in bytes, so that the cluster keeps little for each rank, and large requests (whose
        latency is already small next to their transfer) send none ahead. Measured on 2 cores
        (benchmarks/stream_bench.py, 400k rows, old and new alternated, medians of 4): 1.28x the
        samples/s at ``prefetch`` 8, 1.14x at 64, 1.37x at 256 with 2 sent ahead; 6 were no faster than 2.
        """
        rows = chunk * -(-plan.global_batch_size // self.world_size)
        return min(SENT_AHEAD, SENT_AHEAD_BYTES // max(1, rows * row_bytes(self.num_features)))

    def _release_unused(self, needed: set[int]) -> None:
        for p in [p for p in self._held if p not in needed]:
            self._held.pop(p).release()

    def batches(
        self, plan: EpochPlan, start_step: int | None = None, y_dtype: np.dtype | None = None,
        then: EpochPlan | None = None,
    ) -> Generator[Batch, None, None]:
        """This rank's batches of ``plan`` from ``start_step`` (default: the plan's first) on, in step order.

        ``then``: the plan of the next pass over these partitions (the next epoch), whose first requests'
        partitions are prepared while this pass ends, and kept for it when this pass runs to its end.
        Otherwise an epoch's first batch waits for them: 122 ms against 58 (medians of 8, the default
        generated data, a rank of 2, on 2 cores).
        """
        y_dtype = np.dtype(y_dtype or np.int64)
        self._workers = sorted(self.client.nthreads())
        steps = list(plan.steps(start_step))
        prefetch = self.steps_in_flight(plan)
        # Two requests alive (the one trained on, the one loading), each half the prefetch window.
        chunk = max(1, prefetch // 2)
        chunks = ramped(steps, chunk, RAMP_FIRST)
        depth = 2 if prefetch >= 2 else 1
        extra = self._sent_ahead(plan, chunk)
        loader = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="dtrain-stream")
        sent: dict[int, _Request] = {}  # requests whose take tasks run on the cluster, not gathered yet
        alive: list[tuple[_Request, concurrent.futures.Future[_Rows]]] = []  # being gathered or trained on
        ahead: set[int] = set()  # partitions of the chunk after the last one sent
        finished = False

        def send(i: int) -> None:
            nonlocal ahead
            if i < len(chunks):
                sent[i] = self._submit(plan, chunks[i])
                if i + 1 < len(chunks):
                    ahead = self._warm(plan, chunks[i + 1])
                elif then is None:
                    ahead = set()
                else:  # the last request: prepare for the next pass's first one
                    first = ramped(list(itertools.islice(then.steps(), chunk)), chunk, RAMP_FIRST)
                    ahead = self._warm(then, first[0] if first else [])

        def load(i: int) -> None:
            if i < len(chunks):
                req = sent.pop(i)
                alive.append((req, loader.submit(self._gather, req, y_dtype)))

        def resubmit() -> int:
            # Suspended at a yield: alive[0]'s rows are in hand. The one loading failed with the
            # scheduler (or it is in hand too); the sent ones' tasks went with it.
            again = [j for j, (_, loading) in enumerate(alive) if j > 0 and _lost(loading)]
            for j in again:
                req = self._submit(plan, alive[j][0].steps)
                alive[j] = (req, loader.submit(self._gather, req, y_dtype))
            for i, req in sent.items():
                req.release()
                sent[i] = self._submit(plan, req.steps)
            for p in ahead:
                self._partition(p)
            return len(again) + len(sent)

        self._resubmit = resubmit
        try:
            for i in range(depth + extra):
                send(i)
            for i in range(depth):
                load(i)
            for i in range(len(chunks)):
                req, loading = alive[0]
                with read_errors("the dataset"):
                    rows = loading.result()
                start = 0
                for step, n, g in zip(req.steps, req.lengths, req.global_rows, strict=True):
                    sl = slice(start, start + n)
                    start += n
                    if not self.lost and (self.client.status not in ("running", "newly-created") or (
                            start == req.total and len(alive) > 1 and _lost(alive[1][1]))):
                        self.lose()
                    yield Batch(plan.epoch, step, rows.x[sl].to(self.device, non_blocking=True),
                                rows.y[sl].to(self.device, non_blocking=True), rows.row_id[sl], g)
                alive.pop(0)
                del rows
                send(i + depth + extra)
                load(i + depth)
                self._release_unused(ahead.union(*(r.partitions for r, _ in alive),
                                                 *(r.partitions for r in sent.values())))
            finished = True
        finally:
            # Stopped early (or failed): nothing more is loaded; a gather already running releases its
            # own futures when it ends.
            for req, loading in alive:
                if loading.cancel():
                    req.release()
            for req in sent.values():
                req.release()
            loader.shutdown(wait=False, cancel_futures=True)
            if self._resubmit is resubmit:  # not a later pass's, if this one is closed after it began
                self._resubmit = None
            # Run to its end: the next pass's first partitions stay (``then``); stopped early: nothing does.
            self._release_unused(ahead if finished else set())
