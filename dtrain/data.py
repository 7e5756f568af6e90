"""Datasets as lazy Dask partitions, and the per-partition work done on the Dask workers.

A :class:`Dataset` knows, for the train and validation splits, one lazy ``dask.delayed`` object per
partition that yields the partition's rows as compact numpy arrays (features standardised, labels as
class indexes). Keys are deterministic, so every rank asking for a partition shares one copy on the
cluster. Statistics (row counts, feature mean and std, the class set) are computed by the workers,
partition by partition, and combined here.
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import dask
import dask.dataframe as dd
import numpy as np
import pandas as pd
from dask.delayed import Delayed

from dtrain.config import DataConfig, UserError

log = logging.getLogger(__name__)

ROW_ID = "row_id"


class DataError(UserError):
    """Bad data found by a worker; pickles across Dask so the rank can report it as one line."""


@dataclass(frozen=True)
class Arrays:
    """Rows of one partition (or a request's worth of them)."""

    x: np.ndarray  # float32 [n, features]
    y: np.ndarray  # int64 class indexes, or float32 targets
    row_id: np.ndarray  # int64

    def __len__(self) -> int:
        return len(self.row_id)

    def take(self, idx: np.ndarray) -> Arrays:
        return Arrays(self.x[idx], self.y[idx], self.row_id[idx])


@dataclass
class Stats:
    """Preprocessing numbers computed across the cluster; saved in the run dir and checkpoints."""

    features: list[str]
    label: str
    task: str
    mean: list[float]
    std: list[float]
    classes: list[Any] | None
    train_sizes: list[int]  # rows of the training split in each partition: the epoch plan's input
    val_sizes: list[int]
    fingerprint: str = ""

    @property
    def train_rows(self) -> int:
        return sum(self.train_sizes)

    @property
    def val_rows(self) -> int:
        return sum(self.val_sizes)

    @property
    def num_outputs(self) -> int:
        return len(self.classes) if self.classes is not None else 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Spec:
    """What a worker needs to turn a DataFrame partition into Arrays for one split."""

    features: tuple[str, ...]
    label: str
    val_fraction: float
    seed: int
    fillna: float | None
    task: str = "auto"
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    classes: tuple[Any, ...] = field(default=())


# -- sources ------------------------------------------------------------------------------------------


def _generate_partition(i: int, rows: int, start: int, features: int, classes: int, noise: float,
                        seed: int) -> pd.DataFrame:
    """Partition ``i`` of the default synthetic data: two Gaussian clusters per class.

    The cluster centres depend on ``seed`` alone, the rows on ``(seed, i)``, so any partition can be
    recomputed anywhere and always comes out the same.
    """
    centres = np.random.default_rng([seed, 0]).normal(0.0, 1.0, size=(classes, 2, features))
    rng = np.random.default_rng([seed, 1, i])
    y = rng.integers(0, classes, size=rows)
    which = rng.integers(0, 2, size=rows)
    x = centres[y, which] + rng.normal(0.0, noise, size=(rows, features))
    df = pd.DataFrame(x.astype(np.float32), columns=[f"f{j}" for j in range(features)])
    df.insert(0, ROW_ID, np.arange(start, start + rows, dtype=np.int64))
    df["label"] = y.astype(np.int64)
    return df


def generated(cfg: DataConfig, seed: int) -> dd.DataFrame:
    """The default synthetic classification dataset, produced partition by partition on the workers."""
    parts = min(cfg.gen_partitions, cfg.gen_rows)
    sizes = [cfg.gen_rows // parts + (1 if i < cfg.gen_rows % parts else 0) for i in range(parts)]
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).tolist()
    meta = _generate_partition(0, 0, 0, cfg.gen_features, cfg.gen_classes, cfg.gen_noise, seed)
    return dd.from_map(
        _generate_partition,
        range(parts),
        sizes,
        starts,
        [cfg.gen_features] * parts,
        [cfg.gen_classes] * parts,
        [cfg.gen_noise] * parts,
        [seed] * parts,
        meta=meta,
        enforce_metadata=False,
        label="dtrain-generate",
    )


def _detect_format(path: str) -> str:
    p = path.rstrip("/")
    for ext, fmt in ((".parquet", "parquet"), (".pq", "parquet"), (".csv", "csv"), (".npy", "npy"),
                     (".zarr", "zarr")):
        if p.endswith(ext):
            return fmt
    if "://" not in path and os.path.isdir(path):
        names = os.listdir(path)
        if any(n.endswith((".parquet", ".pq")) for n in names) or "_metadata" in names:
            return "parquet"
        if any(n.endswith(".csv") for n in names):
            return "csv"
    raise UserError(f"--data: cannot tell the format of {path!r}; pass --format parquet|csv|npy|zarr")


def open_source(cfg: DataConfig, seed: int) -> dd.DataFrame:
    """The dataset as a lazy Dask DataFrame; errors name the flag and the fix."""
    if cfg.data is None:
        return generated(cfg, seed)
    path = cfg.data
    if "://" not in path and not glob.glob(path):
        raise UserError(f"--data: no such file or directory {path!r}; check the path")
    fmt = cfg.format if cfg.format != "auto" else _detect_format(path)
    try:
        if fmt == "parquet":
            return dd.read_parquet(path)
        if fmt == "csv":
            target = os.path.join(path, "*.csv") if os.path.isdir(path) else path
            return dd.read_csv(target, blocksize="64MB")
    except (OSError, ValueError) as e:
        raise UserError(f"--data: cannot read {path!r} as {fmt} ({e}); check the path and --format") from None
    raise UserError(f"--format: {fmt} is not supported yet; convert the data to Parquet (python -m dtrain.datagen)")


# -- work done on the workers -------------------------------------------------------------------------


def _mix64(x: np.ndarray, seed: int) -> np.ndarray:
    """SplitMix64 finaliser: a well-spread hash of the row ids, vectorised."""
    with np.errstate(over="ignore"):
        z = x.astype(np.uint64) + np.uint64((seed * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def is_validation(row_id: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Rows held out for evaluation: a hash of the row id, so the split ignores partitioning."""
    if fraction <= 0:
        return np.zeros(len(row_id), dtype=bool)
    return _mix64(row_id, seed) < np.uint64(int(fraction * 2.0**64))


def split_frame(df: pd.DataFrame, spec: Spec, split: str) -> pd.DataFrame:
    val = is_validation(df[ROW_ID].to_numpy(), spec.val_fraction, spec.seed)
    return df[val if split == "val" else ~val]


def summarize(df: pd.DataFrame, spec: Spec) -> dict[str, Any]:
    """Per-partition statistics of the training split: count, mean, M2, labels, NaNs."""
    train = split_frame(df, spec, "train")
    x = train[list(spec.features)].to_numpy(dtype=np.float64)
    nan = int(np.isnan(x).sum()) + int(train[spec.label].isna().sum())
    if spec.fillna is not None:
        x = np.nan_to_num(x, nan=spec.fillna)
    n = len(x)
    mean = x.mean(axis=0) if n else np.zeros(x.shape[1])
    m2 = ((x - mean) ** 2).sum(axis=0) if n else np.zeros(x.shape[1])
    label = df[spec.label]
    integral = pd.api.types.is_integer_dtype(label.dtype) or pd.api.types.is_bool_dtype(label.dtype)
    classes = np.unique(label.dropna().to_numpy()) if integral or spec.task == "classification" else None
    return {"n": n, "val": len(df) - n, "mean": mean, "m2": m2, "classes": classes, "nan": nan,
            "integral": integral}


def prepare(df: pd.DataFrame, spec: Spec, split: str) -> Arrays:
    """A partition's rows of one split as standardised float32 features and label indexes."""
    part = split_frame(df, spec, split)
    x = part[list(spec.features)].to_numpy(dtype=np.float32)
    if spec.fillna is not None:
        x = np.nan_to_num(x, nan=spec.fillna)
    x = (x - np.asarray(spec.mean, dtype=np.float32)) / np.asarray(spec.std, dtype=np.float32)
    labels = part[spec.label].to_numpy()
    if spec.classes:
        y = np.searchsorted(np.asarray(spec.classes), labels).astype(np.int64)
    else:
        y = labels.astype(np.float32)
    return Arrays(np.ascontiguousarray(x), y, part[ROW_ID].to_numpy(dtype=np.int64))


def take_rows(arrays: Arrays, idx: np.ndarray) -> Arrays:
    """The requested rows of a prepared partition: runs where the partition lives."""
    return arrays.take(idx)


def _with_row_ids(df: pd.DataFrame, offsets: list[int], partition_info: dict[str, Any] | None = None) -> pd.DataFrame:
    start = offsets[partition_info["number"]] if partition_info else 0
    df = df.copy()
    df[ROW_ID] = np.arange(start, start + len(df), dtype=np.int64)
    return df


# -- the dataset as seen by a rank ----------------------------------------------------------------------


class Dataset:
    """Lazy partitions of the train and validation splits, plus their statistics."""

    def __init__(self, ddf: dd.DataFrame, cfg: DataConfig, seed: int):
        self.cfg = cfg
        self.seed = seed
        columns = list(ddf.columns)
        listed = ", ".join(map(str, columns))
        if cfg.label not in columns:
            raise UserError(f"--label: no column {cfg.label!r} in the data; columns are {listed}")
        features = list(cfg.features) or [
            c for c in columns if c not in (cfg.label, ROW_ID) and pd.api.types.is_numeric_dtype(ddf.dtypes[c])
        ]
        missing = [c for c in features if c not in columns]
        if missing:
            raise UserError(f"--features: no column {missing[0]!r} in the data; columns are {listed}")
        non_numeric = [c for c in features if not pd.api.types.is_numeric_dtype(ddf.dtypes[c])]
        if non_numeric:
            raise UserError(
                f"--features: column {non_numeric[0]!r} is not numeric ({ddf.dtypes[non_numeric[0]]}); "
                "encode it as numbers or leave it out of --features"
            )
        if not features:
            raise UserError("--features: the data has no numeric feature columns; name them with --features")
        self.features = features
        if ROW_ID not in columns:
            # Row ids are the rows' global positions; they need the partitions' lengths first.
            lengths = ddf.map_partitions(len).compute().tolist()
            offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(int).tolist()
            ddf = ddf.map_partitions(_with_row_ids, offsets, meta={**ddf.dtypes.to_dict(), ROW_ID: np.int64})
        self.ddf = ddf
        self._parts: list[Delayed] = list(ddf.to_delayed())
        self.token = dask.base.tokenize(self.ddf, features, cfg.label, cfg.val_fraction, seed, cfg.fillna)
        self.stats: Stats | None = None
        self._spec = Spec(tuple(features), cfg.label, cfg.val_fraction, seed, cfg.fillna, cfg.task)

    @property
    def num_partitions(self) -> int:
        return len(self._parts)

    def compute_stats(self) -> Stats:
        """Counts, standardisation and class set, computed by the workers partition by partition."""
        summaries = dask.compute(*[dask.delayed(summarize)(p, self._spec) for p in self._parts])
        n = sum(s["n"] for s in summaries)
        val = sum(s["val"] for s in summaries)
        if n == 0:
            raise UserError(f"--data: the training split is empty ({val} validation rows); "
                            "use more data or a smaller --val-fraction")
        nan = sum(s["nan"] for s in summaries)
        if nan and self.cfg.fillna is None:
            raise UserError(f"--data: {nan} missing values in the features or label; "
                            "clean the data or pass --fillna VALUE")
        mean = sum(s["n"] * s["mean"] for s in summaries) / n
        m2 = sum(s["m2"] + s["n"] * (s["mean"] - mean) ** 2 for s in summaries)
        std = np.sqrt(m2 / n)
        std = np.where(std > 0, std, 1.0)
        task = self.cfg.task
        if task == "auto":
            task = "classification" if all(s["integral"] for s in summaries) else "regression"
        classes = None
        if task == "classification":
            seen = [set(s["classes"].tolist()) for s in summaries if s["classes"] is not None]
            classes = sorted(set().union(*seen))
            if len(classes) < 2:
                raise UserError(f"--label: column {self.cfg.label!r} has {len(classes)} class; "
                                "classification needs at least 2 (or pass --task regression)")
        self.stats = Stats(self.features, self.cfg.label, task, mean.tolist(), std.tolist(), classes,
                           [int(s["n"]) for s in summaries], [int(s["val"]) for s in summaries], self.token)
        return self.stats

    def use_stats(self, stats: Stats) -> None:
        """Adopt statistics computed elsewhere (by rank 0, or saved in a checkpoint)."""
        self.stats = stats

    def partitions(self, split: str) -> list[Delayed]:
        """One lazy Arrays per partition, keyed deterministically so ranks share them on the cluster."""
        assert self.stats is not None, "compute_stats() or use_stats() first"
        s = self.stats
        spec = Spec(tuple(self.features), self.cfg.label, self.cfg.val_fraction, self.seed, self.cfg.fillna,
                    s.task, tuple(s.mean), tuple(s.std), tuple(s.classes or ()))
        key = hashlib.sha1(f"{self.token}-{dask.base.tokenize(spec)}".encode()).hexdigest()[:16]
        return [
            dask.delayed(prepare, pure=True)(p, spec, split, dask_key_name=f"dtrain-{split}-{key}-{i}")
            for i, p in enumerate(self._parts)
        ]
