"""Guarantee 5, bounded memory: a rank's memory does not grow with the data it streams.

Streams a generated dataset many times larger than the prefetch window through ``Stream`` on the real
LocalCluster, sampling this process's resident memory; the stream must also hold only the partitions
its pending requests read.
"""

from __future__ import annotations

from typing import Any

import psutil
import pytest

from dtrain.config import DataConfig
from dtrain.data import open_dataset
from dtrain.data.plan import EpochPlan
from dtrain.data.stream import Stream

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(180)]

MB = 2**20
GROWTH_BOUND = 30 * MB
# Imports, Dask's first tasks, the first shuffle windows and buffers.
WARM_UP_EPOCHS = 2


def test_rss_stays_flat_while_streaming_much_more_data(dask_client: Any) -> None:
    # Wide rows make the data large next to what Dask keeps: its comms log their last 1000 messages
    # (distributed.admin.low-level-log-length), and a request carries 4 bytes per row it asks for.
    # With a request's rows in glibc's heaps, this test measured 15-25 MB more per epoch when it ran
    # after tests/test_data.py in one process (dtrain.data.stream maps each request's rows on its own).
    cfg = DataConfig(gen_rows=270_000, gen_features=128, gen_partitions=24, shuffle_window=4)
    dataset = open_dataset(cfg, 0)
    stats = dataset.compute_stats()
    prefetch, batch, window = 16, 2048, cfg.shuffle_window
    stream = Stream(dask_client, dataset.partitions("train"), len(stats.features), 0, 1, prefetch)
    window_bytes = prefetch * batch * (len(stats.features) * 4 + 16)
    proc = psutil.Process()
    rss: list[list[int]] = []  # per epoch, sampled every 5 steps
    held: list[int] = []
    streamed = 0  # bytes handed to the loop after the warm-up
    for epoch in range(WARM_UP_EPOCHS + 3):
        rss.append([])
        plan = EpochPlan(tuple(stats.train_sizes), batch, seed=0, epoch=epoch, shuffle_window=window)
        for step, b in enumerate(stream.batches(plan)):
            if epoch >= WARM_UP_EPOCHS:
                streamed += b.x.numel() * 4 + b.y.numel() * 8 + b.row_id.nbytes
            if step % 5 == 0:
                rss[-1].append(proc.memory_info().rss)
                held.append(len(stream._held))
        assert stream._held == {}, "a finished pass holds no partition"
    after_warm_up = rss[WARM_UP_EPOCHS - 1][-1]
    growth = max(r for epoch in rss[WARM_UP_EPOCHS:] for r in epoch) - after_warm_up
    assert streamed >= 10 * GROWTH_BOUND and streamed >= 20 * window_bytes, (streamed, window_bytes)
    assert growth < GROWTH_BOUND, (f"RSS grew {growth / MB:.1f} MB while streaming {streamed / MB:.0f} MB: "
                                   + " | ".join(", ".join(f"{r / MB:.0f}" for r in epoch) for epoch in rss))
    # The partitions of the two requests alive and of the next one. A request (8 steps, 16k rows) is
    # smaller than a shuffle window (4 partitions, 45k rows), so three requests touch at most 3 windows.
    assert max(held) <= 3 * window and stream.max_held <= 3 * window, (max(held), stream.max_held)
