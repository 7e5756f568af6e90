"""Sources, statistics, the stream and the data errors (dtrain/data/, dtrain/tools/datagen.py).

Cluster tests run on the session's real LocalCluster (``dask_client``); the distributed test runs real
horovodrun over a dataset written by ``python -m dtrain.datagen``.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import dask
import numpy as np
import pandas as pd
import pytest
import torch

from dtrain.config import ConfigError, DataConfig, UserError
from dtrain.data import Arrays, DataError, Dataset, Stats, generated, is_validation, open_dataset
from dtrain.data.plan import EpochPlan
from dtrain.data.stream import RAMP_FIRST, Stream, ramped
from dtrain.tools import datagen

ROWS, PARTS, FEATURES = 3001, 5, 6


@pytest.fixture(scope="module")
def parquet_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pq") / "data"
    datagen.write(str(out), ROWS, FEATURES, 4, PARTS, seed=3)
    return out


def frame(path: Path) -> pd.DataFrame:
    """The dataset read directly with pandas, in partition order."""
    return pd.concat([pd.read_parquet(f) for f in sorted(path.glob("*.parquet"))], ignore_index=True)


def dataset(data: str | Path | None, seed: int = 0, **kw: Any) -> Dataset:
    cfg = DataConfig(data=str(data) if data is not None else None, **kw)
    return open_dataset(cfg, seed)


def prepared(ds: Dataset, split: str) -> list[Arrays]:
    return list(dask.compute(*ds.partitions(split)))


def stream_epoch(client: Any, ds: Dataset, stats: Stats, batch: int, world: int, rank: int, prefetch: int | None = 4,
                 epoch: int = 0, start_step: int = 0) -> list[Any]:
    plan = EpochPlan(tuple(stats.train_sizes), batch, seed=1, epoch=epoch, shuffle_window=2)
    stream = Stream(client, ds.partitions("train"), len(stats.features), rank, world, prefetch)
    y_dtype = np.dtype(np.int64 if stats.task == "classification" else np.float32)
    out = list(stream.batches(plan, start_step, y_dtype))
    assert stream._held == {}, "every partition future is released at the end of the pass"
    return out


def one_line_error(excinfo: pytest.ExceptionInfo[BaseException], flag: str) -> str:
    text = str(excinfo.value)
    assert isinstance(excinfo.value, UserError)
    assert "\n" not in text, text
    assert text.startswith(flag), text
    return text


# -- datagen and Parquet ----------------------------------------------------------------------------------


@pytest.mark.unit
def test_datagen_writes_the_generated_rows(parquet_dir: Path) -> None:
    """One file per partition, with row ids, holding exactly dtrain's generated data for the same seed."""
    files = sorted(p.name for p in parquet_dir.iterdir())
    assert files == [f"part-{i:05d}.parquet" for i in range(PARTS)]
    cfg = DataConfig(gen_rows=ROWS, gen_features=FEATURES, gen_classes=4, gen_partitions=PARTS)
    expected = generated(cfg, 3).compute(scheduler="sync").reset_index(drop=True)
    pd.testing.assert_frame_equal(frame(parquet_dir), expected, check_dtype=False)
    assert frame(parquet_dir)["row_id"].tolist() == list(range(ROWS))


@pytest.mark.cluster
def test_parquet_stats_match_pandas(dask_client: Any, parquet_dir: Path) -> None:
    ds = dataset(parquet_dir, val_fraction=0.1)
    stats = ds.compute_stats()
    df = frame(parquet_dir)
    train_ids = np.concatenate([a.row_id for a in prepared(ds, "train")])
    val_ids = np.concatenate([a.row_id for a in prepared(ds, "val")])
    assert sorted([*train_ids, *val_ids]) == list(range(ROWS))
    assert stats.train_rows == len(train_ids) and stats.val_rows == len(val_ids)
    assert stats.train_rows + stats.val_rows == ROWS and len(stats.train_sizes) == PARTS
    assert 0.07 < stats.val_rows / ROWS < 0.13
    train = df.set_index("row_id").loc[train_ids]
    features = [f"f{j}" for j in range(FEATURES)]
    assert stats.features == features and stats.task == "classification"
    np.testing.assert_allclose(stats.mean, train[features].astype(np.float64).mean().to_numpy(), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(stats.std, train[features].astype(np.float64).std(ddof=0).to_numpy(), rtol=1e-6)
    assert stats.classes == sorted(df["label"].unique().tolist())


@pytest.mark.unit
def test_partition_keys_are_shared_by_datasets_and_processes(parquet_dir: Path) -> None:
    """Ranks are separate processes: they must name a partition alike to share it on the cluster."""
    stats = Stats([f"f{j}" for j in range(FEATURES)], "label", "classification", [0.0] * FEATURES,
                  [1.0] * FEATURES, [0, 1, 2, 3], [1] * PARTS, [1] * PARTS)
    code = ("import sys, json; from dtrain.config import DataConfig; from dtrain.data import Stats, "
            "open_dataset; c = DataConfig(data=sys.argv[1]); d = open_dataset(c, 0); "
            "d.use_stats(Stats(**json.loads(sys.argv[2]))); print(json.dumps([p.key for p in d.partitions('train')]))")
    other = subprocess.run([sys.executable, "-c", code, str(parquet_dir), json.dumps(stats.to_dict())],
                           capture_output=True, text=True, check=True, timeout=120)
    keys = []
    for _ in range(2):
        ds = dataset(parquet_dir)
        ds.use_stats(stats)
        keys.append([p.key for p in ds.partitions("train")])
    assert keys[0] == keys[1] == json.loads(other.stdout)
    assert len(set(keys[0])) == PARTS
    ds_val = dataset(parquet_dir)
    ds_val.use_stats(stats)
    assert set(keys[0]).isdisjoint(p.key for p in ds_val.partitions("val"))
    assert dataset(parquet_dir, seed=1).token != dataset(parquet_dir).token


# -- the stream ------------------------------------------------------------------------------------------


@pytest.mark.cluster
def test_stream_follows_the_plan_exactly_once(dask_client: Any, parquet_dir: Path) -> None:
    ds = dataset(parquet_dir)
    stats = ds.compute_stats()
    batch = 100
    assert stats.train_rows % batch, "a partial last batch is part of the test"
    parts = prepared(ds, "train")
    ids_at = np.concatenate([a.row_id for a in parts])  # plan position -> row id
    x_at = np.concatenate([a.x for a in parts])
    plan = EpochPlan(tuple(stats.train_sizes), batch, seed=1, epoch=0, shuffle_window=2)
    labels = frame(parquet_dir).set_index("row_id")["label"]
    seen: list[np.ndarray] = []
    xs = []
    for rank in (0, 1):
        batches = stream_epoch(dask_client, ds, stats, batch, 2, rank)
        assert [b.step for b in batches] == list(range(plan.num_steps))
        for b in batches:
            pos = plan.rank_batch(b.step, 2, rank)
            np.testing.assert_array_equal(b.row_id, ids_at[pos])
            np.testing.assert_array_equal(b.x.numpy(), x_at[pos])
            np.testing.assert_array_equal(b.y.numpy(), np.searchsorted(np.asarray(stats.classes), labels.loc[b.row_id]))
            assert b.global_rows == plan.batch_rows(b.step) and b.rows == len(pos)
            seen.append(b.row_id)
            xs.append(b.x.numpy())
    counts = Counter(np.concatenate(seen).tolist())
    assert len(counts) == stats.train_rows and set(counts.values()) == {1}
    x = np.concatenate(xs).astype(np.float64)
    np.testing.assert_allclose(x.mean(axis=0), 0, atol=1e-5)
    np.testing.assert_allclose(x.std(axis=0), 1, atol=1e-5)


@pytest.mark.cluster
def test_stream_resumes_mid_epoch_and_releases_on_early_stop(dask_client: Any, parquet_dir: Path) -> None:
    ds = dataset(parquet_dir)
    stats = ds.compute_stats()
    full = stream_epoch(dask_client, ds, stats, 64, 1, 0, epoch=2)
    resumed = stream_epoch(dask_client, ds, stats, 64, 1, 0, epoch=2, start_step=7)
    assert [b.step for b in resumed] == [b.step for b in full[7:]]
    for a, b in zip(full[7:], resumed, strict=True):
        np.testing.assert_array_equal(a.row_id, b.row_id)
    # Stopping after a few steps releases every future this stream asked for.
    stream = Stream(dask_client, ds.partitions("train"), len(stats.features), 0, 1, prefetch=4)
    before = set(dask_client.futures)
    it = stream.batches(EpochPlan(tuple(stats.train_sizes), 64, shuffle_window=2))
    for _ in range(3):
        next(it)
    assert set(dask_client.futures) - before, "requests are in flight"
    it.close()
    assert stream._held == {}
    deadline = time.monotonic() + 10
    while set(dask_client.futures) - before and time.monotonic() < deadline:
        time.sleep(0.05)  # a gather already running releases its own futures when it ends
    assert not set(dask_client.futures) - before


@pytest.mark.cluster
def test_stream_prepares_the_next_epoch_while_one_ends(dask_client: Any, parquet_dir: Path) -> None:
    """``then``: the next pass's first partitions are held when a pass ends, and that pass streams the
    same rows as a fresh stream; a pass stopped early keeps nothing."""
    ds = dataset(parquet_dir)
    stats = ds.compute_stats()
    plans = [EpochPlan(tuple(stats.train_sizes), 64, seed=1, epoch=e, shuffle_window=2) for e in range(3)]
    stream = Stream(dask_client, ds.partitions("train"), len(stats.features), 0, 1, prefetch=8)
    list(stream.batches(plans[0], then=plans[1]))
    first = plans[1].windows_between(*plans[1].batch_bounds(0))
    assert set(stream._held) == {p for w in first for p in plans[1].window_partitions(w)}
    second = list(stream.batches(plans[1], then=plans[2]))
    fresh = stream_epoch(dask_client, ds, stats, 64, 1, 0, prefetch=8, epoch=1)
    assert [b.step for b in second] == [b.step for b in fresh]
    for a, b in zip(second, fresh, strict=True):
        np.testing.assert_array_equal(a.row_id, b.row_id)
        assert torch.equal(a.x, b.x)
    it = stream.batches(plans[2], then=plans[0])
    next(it)
    it.close()
    assert stream._held == {}


@pytest.mark.cluster
def test_stream_default_prefetch_and_relayed_gather_give_the_plan_rows(dask_client: Any, parquet_dir: Path) -> None:
    """The default (byte-sized, ramped requests) and a client that may not reach the workers directly
    (Dask's direct-to-workers off: rows relayed by the scheduler) stream the same rows as a small window."""
    from distributed import Client

    ds = dataset(parquet_dir)
    stats = ds.compute_stats()
    small = stream_epoch(dask_client, ds, stats, 64, 2, 1, prefetch=4)
    default = stream_epoch(dask_client, ds, stats, 64, 2, 1, prefetch=None)  # type: ignore[arg-type]
    with Client(dask_client.scheduler.address, direct_to_workers=False, set_as_default=False) as relayed:
        stream = Stream(relayed, ds.partitions("train"), len(stats.features), 1, 2)
        assert not stream._direct
        plan = EpochPlan(tuple(stats.train_sizes), 64, seed=1, shuffle_window=2)
        via_scheduler = list(stream.batches(plan))
    for batches in (default, via_scheduler):
        assert [b.step for b in batches] == [b.step for b in small]
        for a, b in zip(small, batches, strict=True):
            np.testing.assert_array_equal(a.row_id, b.row_id)
            assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)


@pytest.mark.cluster
def test_stream_sends_one_task_per_worker_where_the_partitions_live(dask_client: Any, parquet_dir: Path) -> None:
    """Two workers: every partition is prepared on its home worker, and takes run there, one per worker."""
    from distributed import Client, LocalCluster, get_task_stream

    ds = dataset(parquet_dir)
    stats = ds.compute_stats()
    plan = EpochPlan(tuple(stats.train_sizes), 100, seed=1, shuffle_window=3)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                      host="127.0.0.1") as cluster, Client(cluster, set_as_default=False) as client:
        workers = sorted(client.nthreads())
        stream = Stream(client, ds.partitions("train"), len(stats.features), 1, 2, prefetch=6)
        with get_task_stream(client) as ts:
            batches = list(stream.batches(plan))
    for b in batches:
        pos = plan.rank_batch(b.step, 2, 1)
        assert b.rows == len(pos) and b.global_rows == plan.batch_rows(b.step)
    # The same rows, in the same order, as one worker's (whose requests are gathered differently).
    one_worker = Stream(dask_client, ds.partitions("train"), len(stats.features), 1, 2, prefetch=6)
    for a, b in zip(one_worker.batches(plan), batches, strict=True):
        np.testing.assert_array_equal(a.row_id, b.row_id)
        assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    ids = np.concatenate([b.row_id for b in batches])
    assert len(set(ids.tolist())) == len(ids) == sum(len(plan.rank_batch(s, 2, 1)) for s in range(plan.num_steps))
    tasks = [(str(t["key"]), t["worker"]) for t in ts.data]
    partition_of = {str(d.key): p for p, d in enumerate(ds.partitions("train"))}
    prepared_on = {partition_of[k]: w for k, w in tasks if k in partition_of}
    assert prepared_on == {p: workers[p % 2] for p in range(PARTS)}
    takes = [w for k, w in tasks if k.startswith("take_from")]
    requests = len(ramped(list(plan.steps()), stream.steps_in_flight(plan) // 2, RAMP_FIRST))
    assert set(takes) == set(workers) and requests <= len(takes) <= 2 * requests


# -- other sources ---------------------------------------------------------------------------------------


@pytest.mark.cluster
def test_embedded_cluster_starts_its_workers_with_dtrain_malloc_settings() -> None:
    """WORKER_MALLOC reaches the workers' environment before they start; a variable set by the user wins;
    this process's own environment (what a rank starts later inherits) is left as it was."""
    from unittest import mock

    from distributed import Client

    from dtrain.cluster import WORKER_MALLOC, _local_cluster
    from dtrain.config import ClusterConfig

    ours, users = list(WORKER_MALLOC)
    names = [*WORKER_MALLOC, "OMP_NUM_THREADS"]  # Dask's pre-spawn environment sets that one too
    with mock.patch.dict(os.environ, {users: "1234"}):  # restored after, whatever happens
        os.environ.pop(ours, None)
        os.environ.pop("OMP_NUM_THREADS", None)
        with _local_cluster(ClusterConfig(dask_workers=1)) as cluster, Client(cluster, set_as_default=False) as client:
            here = {k: os.environ.get(k) for k in names}
            seen = client.run(lambda: {k: os.environ.get(k) for k in names})
    assert list(seen.values()) == [{ours: str(WORKER_MALLOC[ours]), users: "1234", "OMP_NUM_THREADS": "1"}]
    assert here == {ours: None, users: "1234", "OMP_NUM_THREADS": None}


@pytest.mark.cluster
def test_dask_cluster_sh_starts_workers_with_dtrains_malloc_settings(tmp_path: Path) -> None:
    """A real scheduler and worker from the script: its address on stdout, WORKER_MALLOC in the worker
    unless the caller exported a value of its own."""
    from distributed import Client

    from dtrain.cluster import WORKER_MALLOC

    ours, users = list(WORKER_MALLOC)
    env = {k: v for k, v in os.environ.items() if k not in WORKER_MALLOC and k != "DTRAIN_VENV"}
    env[users] = "1234"
    script = Path(__file__).resolve().parents[1] / "launch" / "dask_cluster.sh"
    cmd = [str(script), "-n", "1", "--host", "127.0.0.1", "--port", "0", "--dashboard-port", "0",
           "--dir", str(tmp_path / "dask")]
    with open(tmp_path / "stderr", "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
    try:
        assert proc.stdout is not None
        address = proc.stdout.readline().strip()
        assert address.startswith("tcp://127.0.0.1:"), (tmp_path / "stderr").read_text()[-2000:]
        with Client(address, set_as_default=False, timeout=30) as client:
            seen = client.run(lambda: {k: os.environ.get(k) for k in WORKER_MALLOC})
        assert list(seen.values()) == [{ours: str(WORKER_MALLOC[ours]), users: "1234"}]
    finally:
        running = proc.poll() is None
        proc.terminate()
        code = proc.wait(timeout=60)
    assert running and code == 143  # stopped by SIGTERM, its scheduler and worker with it


def _write_sources(df: pd.DataFrame, tmp: Path) -> dict[str, dict[str, Any]]:
    x = df[[c for c in df.columns if c.startswith("f")]].to_numpy(np.float32)
    y = df["label"].to_numpy(np.int64)
    (tmp / "csv").mkdir()
    half = len(df) // 2  # a glob over two files
    df.iloc[:half].drop(columns="row_id").to_csv(tmp / "csv" / "a.csv", index=False)
    df.iloc[half:].drop(columns="row_id").to_csv(tmp / "csv" / "b.csv", index=False)
    np.save(tmp / "x.npy", x)
    np.save(tmp / "y.npy", y)
    sources = {"csv": {"data": str(tmp / "csv" / "*.csv")},
               "npy": {"data": str(tmp / "x.npy"), "label": str(tmp / "y.npy")}}
    try:
        import zarr
    except ImportError:
        return sources
    group = zarr.open_group(str(tmp / "d.zarr"), mode="w")
    group.create_array("x", shape=x.shape, chunks=(700, x.shape[1]), dtype=x.dtype)[:] = x
    group.create_array("y", shape=y.shape, chunks=(700,), dtype=y.dtype)[:] = y
    sources["zarr"] = {"data": str(tmp / "d.zarr")}
    return sources


@pytest.mark.cluster
@pytest.mark.parametrize("fmt", ["csv", "npy", "zarr", "file-url"])
def test_other_sources_end_to_end(dask_client: Any, parquet_dir: Path, tmp_path: Path, fmt: str) -> None:
    """The same rows as CSV, .npy, zarr and a file:// URL: same statistics, every row streamed once."""
    df = frame(parquet_dir)
    sources = _write_sources(df, tmp_path)
    sources["file-url"] = {"data": parquet_dir.as_uri()}
    if fmt not in sources:
        pytest.skip("zarr is not installed")
    reference = dataset(parquet_dir).compute_stats()
    ds = dataset(**sources[fmt])
    stats = ds.compute_stats()
    assert stats.train_rows + stats.val_rows == ROWS
    assert stats.classes == reference.classes and len(stats.features) == FEATURES
    # Row ids are the rows' positions for every source, so the split and the statistics agree.
    assert stats.train_rows == reference.train_rows
    if fmt == "file-url":
        assert stats.train_sizes == reference.train_sizes
    np.testing.assert_allclose(stats.mean, reference.mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats.std, reference.std, rtol=1e-5)
    batches = stream_epoch(dask_client, ds, stats, 128, 1, 0)
    ids = np.concatenate([b.row_id for b in batches])
    assert sorted(ids.tolist()) == sorted(np.flatnonzero(~is_validation(np.arange(ROWS), 0.1, 0)).tolist())
    labels = df.set_index("row_id")["label"]
    for b in batches[:3]:
        np.testing.assert_array_equal(b.y.numpy(), np.searchsorted(np.asarray(stats.classes), labels.loc[b.row_id]))


@pytest.mark.cluster
def test_label_kinds_regression_and_text_classes(dask_client: Any, tmp_path: Path) -> None:
    df = _small_frame(300)
    df["target"] = df["a"] * 2.5 + 1.0  # float: regression under --task auto
    df["kind"] = np.array(["cat", "dog", "emu"])[df["label"]]  # text: classes
    path = _parquet(tmp_path, df)
    reg = dataset(path, label="target", features=["a", "b"])
    stats = reg.compute_stats()
    assert stats.task == "regression" and stats.classes is None and stats.num_outputs == 1
    batches = stream_epoch(dask_client, reg, stats, 50, 1, 0)
    for b in batches:
        assert b.y.dtype == torch.float32
        np.testing.assert_allclose(b.y.numpy(), df["target"].to_numpy()[b.row_id], rtol=1e-6)
    text = dataset(path, label="kind", features=["a", "b"])
    stats = text.compute_stats()
    assert stats.task == "classification" and stats.classes == ["cat", "dog", "emu"]
    for b in stream_epoch(dask_client, text, stats, 50, 1, 0):
        np.testing.assert_array_equal(b.y.numpy(), df["label"].to_numpy()[b.row_id])
    assert "--task classification" in _stats_error(path, "--task regression", label="kind", task="regression")


# -- errors: one line, naming the flag -------------------------------------------------------------------


def _small_frame(n: int = 200) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    return pd.DataFrame({"a": rng.normal(size=n), "b": rng.normal(size=n), "label": rng.integers(0, 3, n)})


def _parquet(tmp: Path, df: pd.DataFrame, name: str = "d") -> Path:
    (tmp / name).mkdir()
    df.to_parquet(tmp / name / "part-0.parquet", index=False)
    return tmp / name


def _stats_error(data: Path | str, flag: str, **kw: Any) -> str:
    with pytest.raises(UserError) as e:
        dataset(data, **kw).compute_stats()
    return one_line_error(e, flag)


@pytest.mark.cluster
def test_error_missing_label_and_feature_columns(dask_client: Any, parquet_dir: Path) -> None:
    assert "'nope'" in _stats_error(parquet_dir, "--label", label="nope")
    assert "'g1'" in _stats_error(parquet_dir, "--features", features=["f0", "g1"])
    assert "label" in _stats_error(parquet_dir, "--features", features=["f0", "label"])


@pytest.mark.cluster
def test_error_non_numeric_feature(dask_client: Any, tmp_path: Path) -> None:
    df = _small_frame().assign(colour=lambda d: np.where(d.a > 0, "red", "blue"))
    path = _parquet(tmp_path, df)
    assert "'colour'" in _stats_error(path, "--features", features=["a", "colour"])
    # Left to the default, the text column is not a feature.
    assert dataset(path).compute_stats().features == ["a", "b"]


@pytest.mark.cluster
def test_missing_values_need_fillna(dask_client: Any, tmp_path: Path) -> None:
    df = _small_frame()
    df.loc[[3, 50, 120], "a"] = np.nan
    path = _parquet(tmp_path, df)
    assert "3 missing values" in _stats_error(path, "--fillna")
    ds = dataset(path, fillna=0.0)
    stats = ds.compute_stats()
    filled = df["a"].fillna(0.0).to_numpy()
    train = ~is_validation(np.arange(len(df)), 0.1, 0)
    assert stats.mean[0] == pytest.approx(filled[train].mean(), rel=1e-9)
    x = np.concatenate([a.x for a in prepared(ds, "train")])
    assert np.isfinite(x).all()
    df.loc[[7], "label"] = np.nan  # a missing label cannot be filled in
    assert "1 rows have no 'label'" in _stats_error(_parquet(tmp_path, df, "e"), "--label", fillna=0.0)


@pytest.mark.cluster
def test_error_empty_datasets_and_bad_paths(dask_client: Any, tmp_path: Path) -> None:
    empty = _parquet(tmp_path, _small_frame(0))
    assert "no rows" in _stats_error(empty, "--data")
    (tmp_path / "nothing").mkdir()
    assert "empty directory" in _stats_error(tmp_path / "nothing", "--data")
    (tmp_path / "nothing" / "notes.txt").write_text("x")
    assert "--format" in _stats_error(tmp_path / "nothing", "--data")
    assert "no parquet files" in _stats_error(tmp_path / "nothing", "--data", format="parquet")
    assert "no such file" in _stats_error(tmp_path / "missing", "--data")
    assert "no such file" in _stats_error(str(tmp_path / "missing-*.parquet"), "--data")
    (tmp_path / "table.txt").write_text("a,b\n1,2\n")
    assert "cannot tell the format" in _stats_error(tmp_path / "table.txt", "--data")
    with pytest.raises(ConfigError) as e:
        DataConfig(data=str(tmp_path / "table.txt"), format="xls")
    one_line_error(e, "--format")
    assert "validation" in _stats_error(_parquet(tmp_path, _small_frame(1), "one"), "--val-fraction",
                                        val_fraction=0.99)


@pytest.mark.cluster
def test_error_unreadable_files_surface_from_the_workers(dask_client: Any, tmp_path: Path) -> None:
    """A reader failing inside a Dask task reaches the rank as one line naming --data, not a traceback."""
    (tmp_path / "c").mkdir()
    _small_frame(50).to_csv(tmp_path / "c" / "a.csv", index=False)
    bad = _small_frame(50).astype({"b": object})
    bad.loc[10, "b"] = "oops"  # numeric in the first file, text in the second
    bad.to_csv(tmp_path / "c" / "b.csv", index=False)
    _stats_error(str(tmp_path / "c" / "*.csv"), "--data")
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "part-0.parquet").write_bytes(b"not parquet at all")
    assert "cannot read" in _stats_error(tmp_path / "p", "--data")


@pytest.mark.cluster
def test_worker_data_error_crosses_dask_as_user_error(dask_client: Any, parquet_dir: Path) -> None:
    """A DataError raised in a worker task pickles back to the rank as itself: a UserError."""
    ds = dataset(parquet_dir)
    stats = ds.compute_stats()
    assert stats.classes is not None
    ds.use_stats(Stats(**{**stats.to_dict(), "classes": stats.classes[1:]}))  # the data has a class more
    stream = Stream(dask_client, ds.partitions("train"), len(stats.features), 0, 1, prefetch=4)
    with pytest.raises(DataError) as e:
        list(stream.batches(EpochPlan(tuple(stats.train_sizes), 64)))
    assert "is not one of the 3 classes" in one_line_error(e, "--label")


@pytest.mark.cluster
def test_errors_of_array_sources(dask_client: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    np.save(tmp_path / "x.npy", np.ones((10, 3), np.float32))
    np.save(tmp_path / "y9.npy", np.zeros(9, np.int64))
    np.save(tmp_path / "x1.npy", np.ones(10, np.float32))
    (tmp_path / "fake.npy").write_text("not numpy")
    assert "labels file" in _stats_error(tmp_path / "x.npy", "--label")  # --label left at 'label'
    assert "9 labels for 10 rows" in _stats_error(tmp_path / "x.npy", "--label", label=str(tmp_path / "y9.npy"))
    assert "shape (rows, features)" in _stats_error(tmp_path / "x1.npy", "--data", label=str(tmp_path / "y9.npy"))
    assert "numpy.save" in _stats_error(tmp_path / "fake.npy", "--data", label=str(tmp_path / "y9.npy"))
    (tmp_path / "s.zarr").mkdir()
    monkeypatch.setitem(sys.modules, "zarr", None)  # as if not installed: importing it fails
    assert "pip install zarr" in _stats_error(tmp_path / "s.zarr", "--format zarr")


@pytest.mark.cluster
def test_zarr_store_needs_x_and_a_label_array(dask_client: Any, tmp_path: Path) -> None:
    zarr = pytest.importorskip("zarr")
    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="w")
    group.create_array("x", shape=(20, 2), dtype="f4")[:] = np.arange(40, dtype="f4").reshape(20, 2)
    group.create_array("target", shape=(20,), dtype="i8")[:] = np.arange(20) % 2
    assert "--label NAME" in _stats_error(tmp_path / "s.zarr", "--label")
    stats = dataset(tmp_path / "s.zarr", label="target").compute_stats()
    assert stats.classes == [0, 1] and stats.features == ["f0", "f1"]
    group2 = zarr.open_group(str(tmp_path / "t.zarr"), mode="w")
    group2.create_array("features", shape=(20, 2), dtype="f4")
    assert "array x" in _stats_error(tmp_path / "t.zarr", "--data")


# -- the datagen command ---------------------------------------------------------------------------------


@pytest.mark.unit
def test_datagen_command_line(tmp_path: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "dtrain.datagen", *args], capture_output=True, text=True,
                              timeout=120)

    assert run("--help").returncode == 0
    for bad, flag in ((["--rows", "0"], "--rows"), (["--classes", "1"], "--classes"),
                      (["--noise", "-1"], "--noise"), (["--partitions", "x"], "--partitions"), ([], "--out")):
        res = run(*bad) if bad == [] else run("--out", str(tmp_path / "o"), *bad)
        assert res.returncode == 2, res.stderr
        assert len(res.stderr.strip().splitlines()) == 1 and flag in res.stderr, res.stderr
    out = tmp_path / "d"
    assert run("--out", str(out), "--rows", "50", "--partitions", "3").returncode == 0
    assert len(list(out.glob("part-*.parquet"))) == 3
    res = run("--out", str(out), "--rows", "50")
    assert res.returncode == 2 and "--overwrite" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert run("--out", str(out), "--rows", "40", "--partitions", "2", "--overwrite").returncode == 0
    assert sorted(p.name for p in out.iterdir()) == ["part-00000.parquet", "part-00001.parquet"]
    assert len(frame(out)) == 40


@pytest.mark.cluster
def test_datagen_on_an_existing_cluster(dask_client: Any, tmp_path: Path) -> None:
    out = tmp_path / "d"
    address = dask_client.scheduler.address
    res = subprocess.run([sys.executable, "-m", "dtrain.datagen", "--out", str(out), "--rows", "30", "--partitions",
                          "2", "--seed", "3", "--features", str(FEATURES), "--classes", "4", "--scheduler", address],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    cfg = DataConfig(gen_rows=30, gen_features=FEATURES, gen_classes=4, gen_partitions=2)
    expected = generated(cfg, 3).compute(scheduler="sync").reset_index(drop=True)
    pd.testing.assert_frame_equal(frame(out), expected, check_dtype=False)


# -- under horovodrun ------------------------------------------------------------------------------------


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_two_ranks_train_on_parquet_every_row_once(horovodrun: Any, tmp_path: Path) -> None:
    data = tmp_path / "data"
    datagen.write(str(data), 2500, 8, 3, 6, seed=5)
    audit = tmp_path / "audit"
    batch = 96
    res = horovodrun(["--data", str(data), "--seed", "5", "--epochs", "1", "--global-batch-size", str(batch),
                      "--hidden", "16", "--audit-dir", str(audit), "--log-every", "5"]).check()
    stats = json.loads((res.run_dir / "stats.json").read_text())
    train_rows = sum(stats["train_sizes"])
    assert train_rows % batch, "the last global batch is partial"
    assert train_rows + sum(stats["val_sizes"]) == 2500 and len(stats["train_sizes"]) == 6
    records = [json.loads(line) for r in (0, 1) for line in (audit / f"rank-{r}.jsonl").read_text().splitlines()]
    assert {rec["rank"] for rec in records} == {0, 1}
    rows = Counter(row for rec in records for row in rec["rows"])
    assert set(rows.values()) == {1} and sum(rows.values()) == train_rows
    expected = set(np.flatnonzero(~is_validation(np.arange(2500), 0.1, 5)).tolist())
    assert set(rows) == expected
    assert res.summary()["steps"] == math.ceil(train_rows / batch)


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_fewer_training_rows_than_ranks_is_one_line(horovodrun: Any, tmp_path: Path) -> None:
    data = tmp_path / "one"
    datagen.write(str(data), 1, 3, 2, 1)
    res = horovodrun(["--data", str(data), "--val-fraction", "0", "--task", "regression", "--epochs", "1"])
    assert res.returncode != 0
    errors = [line for line in res.output.splitlines() if "dtrain: error:" in line]
    assert errors and all("--data:" in line and "1 rows" in line for line in errors), res.output[-3000:]
    # Rank 0 reports. (Another rank may still log Dask's reconnection traceback while the embedded
    # cluster shuts down: a teardown race of dtrain.cluster, not a data error.)
    assert "Traceback" not in res.ranks[0], res.ranks[0]
