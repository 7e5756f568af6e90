"""Samples/s streamed from Dask to one rank through ``Stream``, beside pyarrow reading the same files here.

    .venv/bin/python benchmarks/stream_bench.py --rows 1000000 --json bench.json

Both sides follow the same epoch plan (block shuffle over a window of partitions) with a no-op consumer:

* ``stream``: a LocalCluster prepares the partitions (split, standardise) and cuts each request's rows
  worker-side; the rank gathers them (``dtrain.data.stream.Stream``), as in training;
* ``pyarrow``: this process reads a window's Parquet files with ``pyarrow.parquet.read_table``, converts
  them to numpy once, standardises, and slices each batch out with the same plan positions: the
  in-process upper bound, with no cluster, no serialisation and no memory bound across processes.

The dataset is written by ``dtrain.datagen`` into a temporary directory unless ``--data`` names one.
Prints a table and, with ``--json``, writes the numbers. A script, never a timed assert.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from distributed import Client, LocalCluster

from dtrain.cluster import worker_environment
from dtrain.config import DataConfig
from dtrain.data import Dataset, Stats, open_dataset
from dtrain.data.plan import EpochPlan, group_by_partition
from dtrain.data.stream import Stream, rank_positions
from dtrain.tools import datagen
from dtrain.tools.benchstats import rotation
from dtrain.tools.report import read_metrics

log = logging.getLogger(__name__)


def bench_stream(client: Client, dataset: Dataset, stats: Stats, batch: int, prefetch: int | None, epochs: int,
                 window: int) -> dict[str, Any]:
    stream = Stream(client, dataset.partitions("train"), len(stats.features), 0, 1, prefetch)
    rows, t0 = 0, time.perf_counter()
    for epoch in range(epochs):
        plan = EpochPlan(tuple(stats.train_sizes), batch, seed=0, epoch=epoch, shuffle_window=window)
        for b in stream.batches(plan):
            rows += b.rows
    wall = time.perf_counter() - t0
    return {"rows": rows, "seconds": wall, "samples_per_sec": rows / wall, "max_partitions_held": stream.max_held}


def _load(path: str, features: list[str], mean: np.ndarray, std: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    table = pq.read_table(path)
    x = np.column_stack([table.column(f).to_numpy() for f in features]).astype(np.float32)
    return (x - mean) / std, table.column("label").to_numpy()


def bench_pyarrow(files: list[str], stats: Stats, batch: int, epochs: int, window: int,
                  chunk: int) -> dict[str, Any]:
    """The same plan over whole files (no validation split), read in this process."""
    sizes = tuple(pq.ParquetFile(f).metadata.num_rows for f in files)
    mean, std = np.asarray(stats.mean, np.float32), np.asarray(stats.std, np.float32)
    rows, t0 = 0, time.perf_counter()
    for epoch in range(epochs):
        plan = EpochPlan(sizes, batch, seed=0, epoch=epoch, shuffle_window=window)
        cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        steps = list(plan.steps())
        for c in range(0, len(steps), chunk):
            for positions in rank_positions(plan, steps[c : c + chunk], 1, 0):
                groups = group_by_partition(plan, positions)
                for p in [p for p in cache if p not in {g[0] for g in groups}]:
                    del cache[p]  # past its window: bounded memory, as the stream
                x = np.empty((len(positions), len(stats.features)), np.float32)
                y = np.empty(len(positions), np.int64)
                for p, local, idx in groups:
                    if p not in cache:
                        cache[p] = _load(files[p], stats.features, mean, std)
                    x[idx], y[idx] = cache[p][0][local], cache[p][1][local]
                rows += len(positions)
    wall = time.perf_counter() - t0
    return {"rows": rows, "seconds": wall, "samples_per_sec": rows / wall}


def alternated(runs: dict[str, Callable[[], dict[str, Any]]], repeat: int) -> dict[str, dict[str, Any]]:
    """Each contender ``repeat`` times, taking turns in an order rotated every repeat (a burst of load
    from elsewhere, or what the one before leaves to free, falls on all alike): its fastest run, with
    every run's samples/s in ``all_samples_per_sec``."""
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in runs}
    for r in range(max(1, repeat)):
        for name in rotation(list(runs), r):
            results[name].append(runs[name]())
    return {name: {**max(rs, key=lambda r: r["samples_per_sec"]),
                   "all_samples_per_sec": [r["samples_per_sec"] for r in rs]} for name, rs in results.items()}


def real_run_stall(data: str, batch: int, run_dir: str) -> dict[str, Any]:
    """The fraction of step time a real training run waits for the stream (its metrics' data_stall)."""
    subprocess.run([sys.executable, "-m", "dtrain", "--data", data, "--epochs", "1", "--global-batch-size",
                    str(batch), "--run-dir", run_dir, "--log-every", "20"], check=True, capture_output=True)
    records, _ = read_metrics(Path(run_dir, "metrics.jsonl"))
    lines = [m for m in records if "data_stall" in m][1:]  # skip the warm-up line
    return {"lines": len(lines), "data_stall_median": float(np.median([m["data_stall"] for m in lines])),
            "samples_per_sec_median": float(np.median([m["samples_per_sec"] for m in lines]))}


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", help="existing Parquet directory (default: write one with dtrain.datagen)")
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--features", type=int, default=32)
    ap.add_argument("--partitions", type=int, default=32)
    ap.add_argument("--batch", type=int, default=256, help="rows per step (one rank: the global batch)")
    ap.add_argument("--prefetch", default="auto,8,64,256",
                    help="steps in flight (dtrain --prefetch; auto: its default), comma-separated: one stream run each")
    ap.add_argument("--shuffle-window", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--workers", type=int, default=1, help="Dask workers (processes)")
    ap.add_argument("--threads", type=int, default=2, help="threads per Dask worker")
    ap.add_argument("--repeat", type=int, default=3,
                    help="runs of each, alternated; the table shows the fastest (shared machines)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    prefetches = [None if p == "auto" else int(p) for p in str(args.prefetch).split(",")]

    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or os.path.join(tmp, "data")
        t0 = time.perf_counter()
        if not args.data:
            datagen.write(data, args.rows, args.features, 10, args.partitions)
        gen_s = time.perf_counter() - t0
        files = sorted(os.path.join(data, f) for f in os.listdir(data) if f.endswith(".parquet"))
        with worker_environment():  # the workers' malloc settings of dtrain's own clusters
            cluster = LocalCluster(n_workers=args.workers, threads_per_worker=args.threads, dashboard_address=":0",
                                   host="127.0.0.1")
        with cluster, Client(cluster) as client:
            cfg = DataConfig(data=data)
            dataset = open_dataset(cfg, 0)
            t0 = time.perf_counter()
            stats = dataset.compute_stats()
            stats_s = time.perf_counter() - t0
            contenders: dict[str, Callable[[], dict[str, Any]]] = {
                f"stream prefetch={pf or 'auto'}": functools.partial(
                    bench_stream, client, dataset, stats, args.batch, pf, args.epochs, args.shuffle_window)
                for pf in prefetches}
            contenders["pyarrow in-process"] = functools.partial(
                bench_pyarrow, files, stats, args.batch, args.epochs, args.shuffle_window,
                max(p or 256 for p in prefetches) // 2)
            runs = alternated(contenders, args.repeat)
        stall = real_run_stall(data, args.batch, os.path.join(tmp, "run"))

    arrow = runs["pyarrow in-process"]
    result = {"config": vars(args), "datagen_seconds": gen_s, "stats_seconds": stats_s,
              "runs": runs, "real_run": stall}
    arrow_median = float(np.median(arrow["all_samples_per_sec"]))
    print(f"{'path':<24} {'rows':>10} {'best (s)':>8} {'best samples/s':>15} {'median':>12} {'vs pyarrow':>10}")
    for name, r in runs.items():
        median = float(np.median(r["all_samples_per_sec"]))
        print(f"{name:<24} {r['rows']:>10} {r['seconds']:>8.2f} {r['samples_per_sec']:>15,.0f} {median:>12,.0f} "
              f"{median / arrow_median:>10.2f}")
    print(f"(medians of {args.repeat} alternated runs; datagen {gen_s:.1f}s, statistics pass {stats_s:.1f}s, "
          f"batch {args.batch}, {args.partitions} partitions, shuffle window {args.shuffle_window})")
    print(f"real run (python -m dtrain, 1 rank, default MLP, one epoch): waits for data "
          f"{100 * stall['data_stall_median']:.1f}% of step time (median of {stall['lines']} metrics lines), "
          f"{stall['samples_per_sec_median']:,.0f} samples/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
