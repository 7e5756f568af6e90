"""The dataset as a rank sees it: lazy partitions of the train and validation splits and their statistics.

A :class:`Dataset` knows, for each split, one lazy ``dask.delayed`` object per partition that yields
the partition's rows as compact numpy arrays (``prepare.py``). Keys are deterministic across processes,
so every rank asking for a partition shares one copy on the cluster. Statistics (row counts, feature
mean and std, the class set) are computed by the workers, partition by partition, and combined here.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

import dask
import dask.dataframe as dd
import numpy as np
import pandas as pd
from dask.delayed import Delayed
from dask.highlevelgraph import HighLevelGraph

from dtrain.config import DataConfig, Task
from dtrain.data.follow import FileEntry, FileInfo, number_rows
from dtrain.data.prepare import (
    PartGraph,
    Spec,
    _with_row_ids,
    inspect_new_file,
    is_validation,
    prepare_file,
    prepare_part,
    summarize,
)
from dtrain.data.sources import (
    ARRAY_LABEL,
    ROW_ID,
    Source,
    _digest,
    data_where,
    frame,
    list_source,
    parquet_rows,
    read_errors,
)
from dtrain.errors import UserError

log = logging.getLogger(__name__)

@dataclass
class Stats:
    """Preprocessing numbers computed across the cluster; saved in the run dir and checkpoints."""

    features: list[str]
    label: str
    task: Task
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


def own_graphs(parts: list[Delayed]) -> list[Delayed]:
    """Each partition with only its own tasks in its graph.

    ``to_delayed`` gives every partition the graph of the whole collection, which the client would
    cull again for every request: O(partitions) work per request. Culling once here keeps it O(1).
    """
    return [Delayed(d.key, dict(d.dask.cull({d.key}))) if isinstance(d.dask, HighLevelGraph) else d for d in parts]


def _select_features(ddf: dd.DataFrame, cfg: DataConfig, label: str) -> list[str]:
    columns = list(ddf.columns)
    listed = ", ".join(map(str, columns))
    if label not in columns:
        raise UserError(f"--label: no column {label!r} in the data; columns are {listed}")
    if cfg.features:
        missing = [c for c in cfg.features if c not in columns]
        if missing:
            raise UserError(f"--features: no column {missing[0]!r} in the data; columns are {listed}")
        if label in cfg.features:
            raise UserError(f"--features: {label!r} is the label; leave it out of --features")
        features = list(cfg.features)
    else:
        features = [c for c in columns if c not in (label, ROW_ID)]
        skipped = [c for c in features if not pd.api.types.is_numeric_dtype(ddf.dtypes[c])]
        if skipped:
            log.info("not using non-numeric columns as features: %s (name features with --features)", skipped)
        features = [c for c in features if c not in skipped]
    non_numeric = [c for c in features if not pd.api.types.is_numeric_dtype(ddf.dtypes[c])]
    if non_numeric:
        raise UserError(
            f"--features: column {non_numeric[0]!r} is not numeric ({ddf.dtypes[non_numeric[0]]}); "
            "encode it as numbers or leave it out of --features"
        )
    if not features:
        raise UserError(f"--features: the data has no numeric feature columns (columns: {listed}); "
                        "name them with --features")
    return features


def _check_label_and_ids(ddf: dd.DataFrame, cfg: DataConfig, label: str) -> None:
    if cfg.task == "regression" and not pd.api.types.is_numeric_dtype(ddf.dtypes[label]):
        raise UserError(f"--task regression: the label column {label!r} is not numeric ({ddf.dtypes[label]}); "
                        "pass --task classification or encode the label as numbers")
    if ROW_ID in ddf.columns and not pd.api.types.is_integer_dtype(ddf.dtypes[ROW_ID]):
        raise UserError(f"--data: column {ROW_ID!r} must hold integer row ids, got {ddf.dtypes[ROW_ID]}; "
                        "rename or drop it (dtrain numbers the rows then)")


class Dataset:
    """Lazy partitions of the train and validation splits, plus their statistics."""

    def __init__(self, ddf: dd.DataFrame, cfg: DataConfig, seed: int, source: Source, features: list[str],
                 lengths: list[int] | None):
        """Plain values, no I/O: use :meth:`open`, which reads what these need.

        ``ddf``: the frame of ``source`` (one partition per file for Parquet), its columns checked;
        ``features``: the feature columns; ``lengths``: the rows of each partition where the data has no
        row ids of its own (the ids are the rows' global positions), else None.
        """
        self.cfg = cfg
        self.seed = seed
        self.source = source
        # One partition per file: training reads each with pyarrow, straight to numpy (Dataset.partitions).
        self.data_files = source.paths if source.format == "parquet" else None
        assert self.data_files is None or len(self.data_files) == ddf.npartitions, "one partition per Parquet file"
        self.label = _label(cfg, source)
        self.features = features
        # Only the columns used: Parquet then reads nothing else.
        ddf = ddf[[c for c in (ROW_ID, *self.features, self.label) if c in ddf.columns]]
        self.columns = tuple(map(str, ddf.columns))  # as read from each file (--follow)
        self.own_ids = ROW_ID in ddf.columns
        if not self.own_ids:
            assert lengths is not None and len(lengths) == ddf.npartitions, "Dataset.open counts the rows"
            offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(int).tolist()
            ddf = ddf.map_partitions(_with_row_ids, offsets, meta={**ddf.dtypes.to_dict(), ROW_ID: np.int64})
        self.ddf = ddf
        self._parts: list[Delayed] = own_graphs(list(ddf.to_delayed()))
        schema = {str(c): str(t) for c, t in ddf.dtypes.items()}
        self.token = _digest(list(source.identity), schema, ddf.npartitions, self.features, self.label,
                             cfg.val_fraction, seed, cfg.fillna)[:32]
        self.stats: Stats | None = None
        self._spec = Spec(tuple(self.features), self.label, cfg.val_fraction, seed, cfg.fillna, cfg.task)

    @classmethod
    def open(cls, cfg: DataConfig, seed: int, source: Source | None = None) -> Dataset:
        """The dataset of ``source`` (default: ``--data`` listed now); errors name the flag and the fix.

        The I/O a Dataset needs happens here: the frame's schema is read, its columns checked and, where
        the data has no row ids, the partitions' rows counted (from the Parquet footers: no pass over
        the data).
        """
        source = source or list_source(cfg)
        ddf = frame(source, cfg, seed)
        label = _label(cfg, source)
        features = _select_features(ddf, cfg, label)
        _check_label_and_ids(ddf, cfg, label)
        lengths = None
        if ROW_ID not in ddf.columns:
            with read_errors(data_where(cfg)):
                if source.format == "parquet":
                    lengths = list(dask.compute(*[dask.delayed(parquet_rows, pure=False)(f) for f in source.paths]))
                else:
                    lengths = ddf[[label]].map_partitions(len).compute().tolist()
        return cls(ddf, cfg, seed, source, features, lengths)

    @property
    def num_partitions(self) -> int:
        return len(self._parts)

    def compute_stats(self) -> Stats:
        """Counts, standardisation and class set, computed by the workers partition by partition."""
        with read_errors(data_where(self.cfg)):
            summaries = dask.compute(*[dask.delayed(summarize)(p, self._spec) for p in self._parts])
        self.stats = self._combine(list(summaries))
        return self.stats

    def _combine(self, summaries: list[dict[str, Any]]) -> Stats:
        n = sum(s["n"] for s in summaries)
        val = sum(s["val"] for s in summaries)
        where = data_where(self.cfg)
        if n + val == 0:
            raise UserError(f"--data: {where} has no rows; point --data at a dataset with rows")
        if n == 0:
            raise UserError(f"--val-fraction: the training split is empty ({val} validation rows); "
                            "use more data or a smaller --val-fraction")
        label_nan, nan, inf = (sum(s[k] for s in summaries) for k in ("label_nan", "nan", "inf"))
        if label_nan:
            raise UserError(f"--label: {label_nan} rows have no {self.label!r} value; drop them from the data")
        if nan and self.cfg.fillna is None:
            raise UserError(f"--fillna: {nan} missing values in the features of {where}; "
                            "clean the data or pass --fillna VALUE")
        if inf:
            raise UserError(f"--data: {inf} infinite values in the features of {where}; replace them in the data")
        mean = sum(s["n"] * s["mean"] for s in summaries) / n
        m2 = sum(s["m2"] + s["n"] * (s["mean"] - mean) ** 2 for s in summaries)
        std = np.sqrt(m2 / n)
        std = np.where(std > 0, std, 1.0)  # a constant feature stays 0 after centring
        task = self.cfg.task
        if task == "auto":
            task = "classification" if all(s["categorical"] for s in summaries) else "regression"
        classes = None
        if task == "classification":
            seen = [set(s["classes"].tolist()) for s in summaries if s["classes"] is not None]
            classes = sorted(set().union(*seen))
            if len(classes) < 2:
                raise UserError(f"--label: column {self.label!r} has {len(classes)} class; "
                                "classification needs at least 2 (or pass --task regression)")
        return Stats(self.features, self.label, task, mean.tolist(), std.tolist(), classes,
                     [int(s["n"]) for s in summaries], [int(s["val"]) for s in summaries], self.token)

    def use_stats(self, stats: Stats) -> None:
        """Adopt statistics computed elsewhere (by rank 0, or saved in a checkpoint)."""
        self.stats = stats

    def spec(self) -> Spec:
        """How the workers prepare rows: the statistics in use."""
        assert self.stats is not None, "compute_stats() or use_stats() first"
        s = self.stats
        return Spec(tuple(self.features), self.label, self.cfg.val_fraction, self.seed, self.cfg.fillna,
                    s.task, tuple(s.mean), tuple(s.std), tuple(s.classes or ()))

    def partitions(self, split: str) -> list[Delayed]:
        """One lazy Arrays per partition, keyed deterministically so ranks share them on the cluster."""
        if self.data_files is not None:
            assert self.stats is not None
            rows = [t + v for t, v in zip(self.stats.train_sizes, self.stats.val_sizes, strict=True)]
            offsets: list[int | None] = [None] * len(rows) if self.own_ids else list(number_rows(rows, 0))
            return self._file_partitions(list(zip(self.data_files, rows, offsets, strict=True)), split)
        spec = self.spec()
        key = _digest(self.token, asdict(spec))[:16]
        return [
            dask.delayed(prepare_part, pure=True)(PartGraph.of(p), spec, split,
                                                  dask_key_name=f"dtrain-{split}-{key}-{i}")
            for i, p in enumerate(self._parts)
        ]

    # -- --follow: file by file --------------------------------------------------------------------------

    def first_files(self, files: list[FileInfo]) -> list[FileEntry]:
        """The files the statistics were computed on (one partition each, in order) as segment 0."""
        assert self.stats is not None
        s = self.stats
        rows = [t + v for t, v in zip(s.train_sizes, s.val_sizes, strict=True)]
        offsets: list[int | None] = [None] * len(files) if self.own_ids else list(number_rows(rows, 0))
        return [FileEntry(f.path, f.mtime, f.size, n, t, v, o)
                for f, n, t, v, o in zip(files, rows, s.train_sizes, s.val_sizes, offsets, strict=True)]

    def new_files(self, files: list[FileInfo], next_offset: int) -> list[FileEntry]:
        """Check newly landed files on the cluster and number their rows from ``next_offset`` on."""
        if not files:
            return []
        spec = self.spec()
        with read_errors(", ".join(f.path for f in files[:3])):
            found = dask.compute(*[dask.delayed(inspect_new_file, pure=False)(f.path, self.columns, spec)
                                   for f in files])
        offsets = number_rows([r["rows"] for r in found], next_offset)
        entries = []
        for f, r, offset in zip(files, found, offsets, strict=True):
            if self.own_ids:
                entries.append(FileEntry(f.path, f.mtime, f.size, r["rows"], r["train"], r["val"], None))
            else:
                val = int(is_validation(np.arange(offset, offset + r["rows"], dtype=np.int64), spec.val_fraction,
                                        spec.seed).sum())
                entries.append(FileEntry(f.path, f.mtime, f.size, r["rows"], r["rows"] - val, val, offset))
        return entries

    def file_partitions(self, entries: list[FileEntry], split: str) -> list[Delayed]:
        """One lazy Arrays per file, keyed by the file and its numbering so ranks share them."""
        return self._file_partitions([(e.path, e.rows, e.offset) for e in entries], split)

    def _file_partitions(self, files: list[tuple[str, int, int | None]], split: str) -> list[Delayed]:
        """One lazy Arrays per ``(path, rows, offset)``, keyed by the file and its numbering so ranks share them."""
        spec = self.spec()
        key = _digest(self.token, asdict(spec))[:16]
        read_cols = tuple(c for c in self.columns if c != ROW_ID or self.own_ids)
        out = []
        for path, rows, offset in files:
            name = _digest(path, rows, offset)[:16]
            out.append(dask.delayed(prepare_file, pure=True)(path, read_cols, rows, offset, spec, split,
                                                             dask_key_name=f"dtrain-{split}-{key}-{name}"))
        return out


def _label(cfg: DataConfig, source: Source) -> str:
    return ARRAY_LABEL if source.format in ("npy", "zarr") else cfg.label


def open_dataset(cfg: DataConfig, seed: int) -> Dataset:
    """The dataset of ``--data`` (or the generated one): :meth:`Dataset.open`."""
    return Dataset.open(cfg, seed)
