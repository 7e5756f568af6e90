"""Ranks of a shared-memory group as real processes on this host, for the tests of dtrain.shm and
dtrain.sharded: the ranks agree on names through files (an allgather), as through Horovod in dtrain."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dtrain import shm


def _exchange(directory: Path, rank: int, size: int) -> Callable[[Any], list[Any]]:
    """An allgather through files: enough to let the ranks agree on names, as Horovod's does in dtrain."""
    rounds = iter(range(10**6))

    def exchange(obj: Any) -> list[Any]:
        n = next(rounds)
        (directory / f"x{n}-{rank}.tmp").write_bytes(pickle.dumps(obj))
        os.replace(directory / f"x{n}-{rank}.tmp", directory / f"x{n}-{rank}")
        paths = [directory / f"x{n}-{r}" for r in range(size)]
        while not all(p.exists() for p in paths):
            time.sleep(0.001)
        return [pickle.loads(p.read_bytes()) for p in paths]

    return exchange


def group(directory: Path, rank: int, size: int) -> shm.ShmGroup:
    """Rank ``rank``'s group, its files in ``directory``/shm."""
    (directory / "ex").mkdir(exist_ok=True)
    (directory / "shm").mkdir(exist_ok=True)
    return shm.ShmGroup(rank, size, "test", _exchange(directory / "ex", rank, size), directory=str(directory / "shm"))


def run(size: int, target: Callable[..., None], tmp_path: Path, *extra: Any) -> list[Any]:
    """``target(rank, size, directory, queue, *extra)`` in ``size`` fresh processes; what each put on the
    queue (a pickle of a tuple that starts with its rank), in rank order."""
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=target, args=(r, size, str(tmp_path), out, *extra)) for r in range(size)]
    for p in procs:
        p.start()
    results = [pickle.loads(out.get(timeout=100)) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    return sorted(results, key=lambda r: r[0])


