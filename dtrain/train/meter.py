"""Running sums of the training loop between two metrics lines, and the time it waited for data."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from dtrain.data.stream import Batch


@dataclass
class Meter:
    """Running sums between two metrics lines."""

    loss: float = 0.0
    correct: float = 0.0
    rows: int = 0
    steps: int = 0
    data_wait: float = 0.0  # seconds the loop waited for the stream
    allreduce: float = 0.0  # seconds in collectives that combine the ranks' models
    checkpoint: float = 0.0  # seconds the loop was blocked by checkpoints
    since: float = field(default_factory=time.perf_counter)

    def timing(self, now: float) -> dict[str, float]:
        wall = max(now - self.since, 1e-9)
        return {"samples_per_sec": self.rows / wall, "data_stall": self.data_wait / wall,
                "allreduce_share": self.allreduce / wall, "checkpoint_seconds": self.checkpoint}

    def add(self, loss: float, correct: float, rows: int) -> None:
        self.loss += loss
        self.correct += correct
        self.rows += rows
        self.steps += 1


def timed(batches: Iterator[Batch], meter: Callable[[], Meter]) -> Iterator[Batch]:
    """``batches``, adding the time spent waiting for each one to the current meter."""
    while True:
        t0 = time.perf_counter()
        try:
            batch = next(batches)
        except StopIteration:
            return
        meter().data_wait += time.perf_counter() - t0
        yield batch

