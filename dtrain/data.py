"""Datasets as lazy Dask partitions, and the per-partition work done on the Dask workers.

A :class:`Dataset` knows, for the train and validation splits, one lazy ``dask.delayed`` object per
partition that yields the partition's rows as compact numpy arrays (features standardised, labels as
class indexes). Keys are deterministic across processes, so every rank asking for a partition shares
one copy on the cluster. Statistics (row counts, feature mean and std, the class set) are computed by
the workers, partition by partition, and combined here.

Sources: Parquet (directory, glob or fsspec URL), CSV (file, directory or glob), ``.npy`` (features file
plus ``--label y.npy``), zarr (a group with arrays ``x`` and ``y``), or the generated default. Every
problem with the data reaches the user as one :class:`~dtrain.config.UserError` line naming the flag
and the fix; problems found by a worker are raised there as :class:`DataError`, which pickles across
Dask and arrives on the rank as the same exception.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import dask
import dask.dataframe as dd
import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from dask.delayed import Delayed
from dask.highlevelgraph import HighLevelGraph
from dask.local import get_sync

from dtrain.config import DataConfig, UserError
from dtrain.follow import FileEntry, FileInfo, ignored, number_rows

log = logging.getLogger(__name__)

ROW_ID = "row_id"
ARRAY_LABEL = "label"  # the label column of array sources (npy, zarr), whatever --label says
# Rows of an array source per partition: big enough that per-task overhead is small, small enough
# that a shuffle window of a few partitions stays a few tens of MB on the cluster.
ARRAY_PARTITION_BYTES = 16 * 2**20
FORMATS = ("parquet", "csv", "npy", "zarr")
_PARQUET_EXT = (".parquet", ".pq", ".parq")


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

    def take_into(self, idx: np.ndarray, out: Arrays) -> None:
        """Rows ``idx`` written straight into ``out`` (as many rows). ``mode="clip"``: with its default
        mode numpy takes into a temporary buffer, then copies it; the plan's indexes are in range."""
        np.take(self.x, idx, axis=0, out=out.x, mode="clip")
        np.take(self.y, idx, out=out.y, mode="clip")
        np.take(self.row_id, idx, out=out.row_id, mode="clip")


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


# -- generated data -----------------------------------------------------------------------------------


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


# -- finding the files --------------------------------------------------------------------------------


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _fs(path: str) -> tuple[fsspec.AbstractFileSystem, str]:
    try:
        return fsspec.core.url_to_fs(path)
    except (ImportError, ValueError) as e:  # an unknown protocol, or its package is missing
        raise UserError(f"--data: cannot open {path!r} ({_first_line(e)}); check the URL or install "
                        "the fsspec package for its protocol") from None


def _matches(path: str) -> list[str]:
    """The files or directories ``path`` names (a glob may name many); empty when there are none."""
    fs, root = _fs(path)
    try:
        if fs.exists(root):
            return [root]
        return sorted(fs.glob(root)) if any(c in root for c in "*?[") else []
    except OSError as e:
        raise UserError(f"--data: cannot list {path!r} ({_first_line(e)}); check the path and credentials") from None


_SUFFIXES = (("parquet", _PARQUET_EXT), ("csv", (".csv", ".csv.gz")), ("npy", (".npy",)), ("zarr", (".zarr",)))


def data_format(cfg: DataConfig) -> str | None:
    """The format of ``--data`` (``--format``, else guessed from the names); None for generated data."""
    if cfg.data is None:
        return None
    found = _matches(cfg.data)
    if not found:
        raise UserError(f"--data: no such file or directory {cfg.data!r}; check the path")
    if cfg.format != "auto":
        return cfg.format
    names = [str(n).rstrip("/") for n in found]
    fs, _ = _fs(cfg.data)
    if len(found) == 1 and not names[0].endswith(".zarr") and fs.isdir(found[0]):
        names = [str(n).rstrip("/") for n in fs.ls(found[0], detail=False)]
        if not names:
            raise UserError(f"--data: {cfg.data!r} is an empty directory; point --data at the dataset's files")
        if any(os.path.basename(n) in ("zarr.json", ".zgroup") for n in names):
            return "zarr"
        if any(os.path.basename(n) == "_metadata" for n in names):
            return "parquet"
    for fmt, exts in _SUFFIXES:
        if any(n.endswith(exts) for n in names):
            return fmt
    raise UserError(f"--data: cannot tell the format of {cfg.data!r}; pass --format {'|'.join(FORMATS)}")


def _files(cfg: DataConfig, fmt: str) -> list[str]:
    """The data files of ``--data`` (a file, directory or glob); refuses a selection without any."""
    assert cfg.data is not None
    exts = dict(_SUFFIXES)[fmt]
    fs, _ = _fs(cfg.data)
    files: list[str] = []
    for m in _matches(cfg.data):
        # Names starting with . or _ are bookkeeping (_SUCCESS, .crc), as for Spark and pyarrow.
        inside = sorted(fs.find(m)) if fs.isdir(m) else [m]
        files += [f for f in inside if f.endswith(exts) and not os.path.basename(f).startswith((".", "_"))]
    if not files:
        raise UserError(f"--data: no {fmt} files ({', '.join(exts)}) in {cfg.data!r}; check the path or --format")
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return files if protocol in ("file", "local") else [fs.unstrip_protocol(f) for f in files]


# -- Parquet, file by file (and a followed directory, listed again and again) -------------------------


def _mtime(info: dict[str, Any]) -> float:
    """Modification time from an fsspec listing entry, in seconds (local, S3, GCS and Azure spell it differently)."""
    for key in ("mtime", "LastModified", "last_modified", "updated", "created"):
        value = info.get(key)
        if value is None:
            continue
        if isinstance(value, datetime.datetime):
            return value.timestamp()
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                return datetime.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
            continue
        return float(value)
    return 0.0


def follow_root(source: str) -> str:
    """The followed directory of ``source`` (a directory or a glob); refuses anything else."""
    fs, root = _fs(source)
    if any(c in root for c in "*?["):
        return source
    if not fs.isdir(root):
        raise UserError(f"--follow: --data {source!r} is not a directory or a glob; point --data at the "
                        "directory the Parquet files land in")
    return source


def list_parquet(source: str) -> list[FileInfo]:
    """The Parquet files now in ``source`` (a directory, searched recursively, or a glob), unordered.

    Paths with a component starting with ``.`` or ``_`` below the directory (or the glob's fixed part) are
    skipped: files being written. One listing with details per call, not a request per file.
    """
    fs, root = _fs(source)
    with contextlib.suppress(AttributeError, NotImplementedError):
        fs.invalidate_cache()  # object stores cache listings: a poll must see new files
    pattern = any(c in root for c in "*?[")
    base = root.split("*")[0].split("?")[0].split("[")[0].rsplit("/", 1)[0] if pattern else root
    try:
        infos = fs.glob(root, detail=True) if pattern else fs.find(root, detail=True)
        if pattern:  # a glob may name directories: their files count too
            for name, info in list(infos.items()):
                if info.get("type") == "directory":
                    del infos[name]
                    infos.update(fs.find(name, detail=True))
    except OSError as e:
        raise UserError(f"--follow: cannot list {source!r} ({_first_line(e)}); "
                        "check the path and credentials") from None
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    out = []
    for name, info in infos.items():
        relative = name[len(base):] if name.startswith(base) else os.path.basename(name)
        if not name.endswith(_PARQUET_EXT) or ignored(relative) or info.get("type") == "directory":
            continue
        path = name if protocol in ("file", "local") else fs.unstrip_protocol(name)
        out.append(FileInfo(path, _mtime(info), int(info.get("size") or 0)))
    return out


def parquet_meta(path: str) -> pd.DataFrame:
    """An empty DataFrame with the columns and dtypes of a Parquet file (its schema only is read)."""
    fs, p = _fs(path)
    with read_errors(repr(path)), fs.open(p, "rb") as f:
        return pq.read_schema(f).empty_table().to_pandas()


def read_parquet_table(path: str, columns: tuple[str, ...], rows: int | None = None,
                       offset: int | None = None, flag: str = "--data") -> pa.Table:
    """``columns`` of one Parquet file; rows numbered from ``offset`` when given. Runs on a worker.

    ``rows``: the row count recorded when the file was first read; a file that changed since is refused
    (its rows would no longer be the ones the plan and a resumed run expect). ``flag`` starts the errors.
    """
    fs, p = _fs(path)
    with fs.open(p, "rb") as f:
        pf = pq.ParquetFile(f)
        names = pf.schema_arrow.names
        missing = [c for c in columns if c not in names]
        if missing:
            raise DataError(f"{flag}: {path} has no column {missing[0]!r} (columns: {', '.join(names)}); "
                            f"write every file with the columns of the first ones ({', '.join(columns)})")
        table = pf.read(columns=list(columns))
    if rows is not None and table.num_rows != rows:
        raise DataError(f"{flag}: {path} changed after it was read ({rows} rows then, {table.num_rows} now); "
                        "never change a file once it landed: write a new one")
    if offset is not None:  # files without row ids of their own
        table = table.append_column(ROW_ID, pa.array(np.arange(offset, offset + table.num_rows, dtype=np.int64)))
    return table


def read_parquet_file(path: str, columns: tuple[str, ...], rows: int | None = None,
                      offset: int | None = None, flag: str = "--data") -> pd.DataFrame:
    """:func:`read_parquet_table` as a DataFrame (the partitions of a Parquet source's Dask frame)."""
    return read_parquet_table(path, columns, rows, offset, flag).to_pandas()


def parquet_rows(path: str) -> int:
    """The rows of a Parquet file, from its footer. Runs on a worker."""
    fs, p = _fs(path)
    with fs.open(p, "rb") as f:
        return int(pq.ParquetFile(f).metadata.num_rows)


def inspect_new_file(path: str, columns: tuple[str, ...], spec: Spec) -> dict[str, Any]:
    """Check a newly landed file against the statistics of the first ones; its row count and, when it
    carries row ids, its split. Runs on a worker; problems are one line naming the file and the fix."""
    df = read_parquet_file(path, columns, flag="--follow")
    for c in spec.features:
        if not pd.api.types.is_numeric_dtype(df[c].dtype):
            raise DataError(f"--follow: column {c!r} of {path} is not numeric ({df[c].dtype}); "
                            "write it as numbers, as in the first files")
    x = _features(df, spec, np.float64)
    if spec.fillna is None and np.isnan(x).any():
        raise DataError(f"--follow: {int(np.isnan(x).sum())} missing feature values in {path}; "
                        "clean the file or pass --fillna VALUE")
    if np.isinf(x).any():
        raise DataError(f"--follow: {int(np.isinf(x).sum())} infinite feature values in {path}; replace them")
    label = df[spec.label]
    if label.isna().any():
        raise DataError(f"--follow: {int(label.isna().sum())} rows of {path} have no {spec.label!r} value; drop them")
    if spec.classes:
        known = pd.Index(spec.classes)
        unknown = label[known.get_indexer(label.to_numpy()) < 0]
        if len(unknown):
            raise DataError(f"--follow: label {unknown.iloc[0]!r} in {path} is not one of the {len(known)} classes "
                            "of the first files; the class set is fixed at start: start the run (--resume never) "
                            "from files holding every class")
    elif not pd.api.types.is_numeric_dtype(label.dtype):
        raise DataError(f"--follow: the label {spec.label!r} of {path} is not numeric ({label.dtype}), "
                        "but the task is regression; write it as numbers")
    out: dict[str, Any] = {"rows": len(df)}
    if ROW_ID in df.columns:
        val = is_validation(df[ROW_ID].to_numpy(dtype=np.int64), spec.val_fraction, spec.seed)
        out.update(train=int((~val).sum()), val=int(val.sum()))
    return out


def parquet_source(files: list[str]) -> dd.DataFrame:
    """Parquet files, one partition per file, in the order given (only the columns used are read)."""
    meta = parquet_meta(files[0])
    return dd.from_map(read_parquet_file, files, columns=tuple(map(str, meta.columns)), meta=meta,
                       enforce_metadata=False, label="dtrain-parquet")


# -- array sources (npy, zarr): opened on whichever process reads the rows ------------------------------


@dataclass(frozen=True)
class ArraySource:
    """A features array and its labels, by location: cheap to pickle into every task.

    An array opened with ``np.load(mmap_mode="r")`` pickles *with its contents*, so a graph holding one
    would ship the whole file to the cluster; each task opens the file itself and reads its rows only.
    """

    kind: str  # "npy" or "zarr"
    x: str  # npy: the features file; zarr: the store URL
    y: str  # npy: the labels file; zarr: the label array's name
    x_name: str = "x"

    def open(self) -> tuple[Any, Any]:
        if self.kind == "npy":
            return np.load(self.x, mmap_mode="r"), np.load(self.y, mmap_mode="r")
        import zarr

        group = zarr.open_group(self.x, mode="r")
        return group[self.x_name], group[self.y]


def _array_partition(src: ArraySource, lo: int, hi: int) -> pd.DataFrame:
    """Rows ``[lo, hi)`` of an array source as a DataFrame ``row_id, f0..fN-1, label``."""
    x, y = src.open()
    width = int(np.prod(x.shape[1:]))  # images and other n-d rows become flat feature vectors
    df = pd.DataFrame(np.asarray(x[lo:hi]).reshape(hi - lo, width), columns=[f"f{j}" for j in range(width)])
    df.insert(0, ROW_ID, np.arange(lo, hi, dtype=np.int64))
    df[ARRAY_LABEL] = np.asarray(y[lo:hi]).reshape(hi - lo)
    return df


def _check_arrays(x: Any, y: Any, cfg: DataConfig) -> None:
    if len(x.shape) < 2 or not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_):
        raise UserError(f"--data: the features in {cfg.data!r} must be a numeric array of shape (rows, features), "
                        f"got {x.dtype} {tuple(x.shape)}; save them as a 2-D numeric array")
    if len(y.shape) not in (1, 2) or (len(y.shape) == 2 and y.shape[1] != 1):
        raise UserError(f"--label: the labels must be one value per row, got shape {tuple(y.shape)}; "
                        "save them as a 1-D array")
    if y.shape[0] != x.shape[0]:
        raise UserError(f"--label: {y.shape[0]} labels for {x.shape[0]} rows of features; "
                        "pass the labels that belong to --data")
    if x.shape[0] == 0:
        raise UserError(f"--data: {cfg.data!r} has no rows; use a dataset with data in it")


def _array_frame(src: ArraySource, cfg: DataConfig) -> dd.DataFrame:
    """An array source as a lazy DataFrame, partitioned by rows (whole zarr chunks: each read once)."""
    x, y = src.open()
    _check_arrays(x, y, cfg)
    align = int(getattr(x, "chunks", (1,))[0])
    rows = int(x.shape[0])
    row_bytes = max(1, int(np.prod(x.shape[1:])) * x.dtype.itemsize)
    step = max(align, ARRAY_PARTITION_BYTES // row_bytes // align * align)
    starts = list(range(0, rows, step))
    stops = [min(s + step, rows) for s in starts]
    return dd.from_map(_array_partition, [src] * len(starts), starts, stops, meta=_array_partition(src, 0, 0),
                       enforce_metadata=False, label=f"dtrain-{src.kind}")


def _open_npy(cfg: DataConfig) -> dd.DataFrame:
    assert cfg.data is not None
    if "://" in cfg.data:
        raise UserError(f"--data: .npy data must be a local file, got {cfg.data!r}; copy it locally or use Parquet")
    if not cfg.label.endswith(".npy") or not os.path.isfile(cfg.label):
        raise UserError(f"--label: with .npy features, --label is the labels file; {cfg.label!r} is not a .npy "
                        "file (pass --label y.npy)")
    src = ArraySource("npy", cfg.data, cfg.label)
    try:
        return _array_frame(src, cfg)
    except ValueError as e:  # not an .npy file, or a pickled object array
        raise UserError(f"--data: cannot load {cfg.data!r} or {cfg.label!r} as .npy ({_first_line(e)}); "
                        "save them with numpy.save") from None


def _open_zarr(cfg: DataConfig) -> dd.DataFrame:
    assert cfg.data is not None
    try:
        import zarr
    except ImportError:
        raise UserError("--format zarr: the zarr package is not installed; pip install zarr "
                        "(or pip install 'dtrain[zarr]')") from None
    try:
        group = zarr.open_group(cfg.data, mode="r")
        arrays = sorted(group.array_keys())
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise UserError(f"--data: cannot open {cfg.data!r} as a zarr group ({_first_line(e)}); "
                        "pass a zarr group holding arrays x and y") from None
    if "x" not in arrays:
        raise UserError(f"--data: no array 'x' in {cfg.data!r} (arrays: {', '.join(arrays) or 'none'}); "
                        "store the features as array x")
    label = cfg.label if cfg.label in arrays else "y" if cfg.label == "label" and "y" in arrays else None
    if label is None:
        raise UserError(f"--label: no array {cfg.label!r} in {cfg.data!r} (arrays: {', '.join(arrays)}); "
                        "pass --label NAME of the label array")
    return _array_frame(ArraySource("zarr", cfg.data, label), cfg)


def open_dataset(cfg: DataConfig, seed: int) -> Dataset:
    """The dataset of ``--data`` (or the generated one); errors name the flag and the fix.

    A Parquet source is one partition per file, listed once here and handed to the Dataset, which has
    the workers read each with pyarrow straight to numpy for training.
    """
    if cfg.data is None:
        return Dataset(generated(cfg, seed), cfg, seed)
    fmt = data_format(cfg)
    files = None
    with read_errors(_where(cfg)):
        if fmt == "parquet":
            files = _files(cfg, fmt)
            ddf = parquet_source(files)
        elif fmt == "csv":
            ddf = dd.read_csv(_files(cfg, fmt), blocksize="64MB")
        else:
            ddf = _open_npy(cfg) if fmt == "npy" else _open_zarr(cfg)
    return Dataset(ddf, cfg, seed, files=files)


def _where(cfg: DataConfig) -> str:
    return repr(cfg.data) if cfg.data else "the generated data"


@contextlib.contextmanager
def read_errors(where: str) -> Iterator[None]:
    """Errors from reading the data, here or raised by a worker, as one line naming ``--data``.

    Readers (pyarrow, pandas, fsspec) fail with ``OSError`` or ``ValueError`` subclasses on unreadable
    files; the full traceback goes to the debug log.
    """
    try:
        yield
    except UserError:
        raise
    except (OSError, ValueError) as e:
        log.debug("reading %s failed", where, exc_info=True)
        raise UserError(f"--data: cannot read {where} ({_first_line(e)}); check the files and --format") from None


def _identity(cfg: DataConfig, fmt: str | None) -> list[Any]:
    """What the data is, for the fingerprint: the generator's parameters, or every file's name, size and date.

    Dask's own tokens for file sources differ between processes, so they cannot name partitions that
    every rank shares, nor tell whether a checkpoint was trained on this data.
    """
    if cfg.data is None:
        return ["generated", cfg.gen_rows, cfg.gen_features, cfg.gen_classes, cfg.gen_partitions, cfg.gen_noise]
    files = []
    for path in [cfg.data, cfg.label] if fmt == "npy" else [cfg.data]:
        fs, root = _fs(path)
        # One listing with details (not a request per file: object stores answer slowly).
        if fs.exists(root):
            infos = fs.find(root, detail=True) if fs.isdir(root) else {root: fs.info(root)}
        else:
            infos = fs.glob(root, detail=True)
        for name in sorted(infos)[:10000]:  # capped: a zarr store has a file per chunk
            info = infos[name]
            when = next((info[k] for k in ("mtime", "LastModified", "updated", "ETag") if k in info), None)
            files.append([name, info.get("size"), str(when)])
    return [fmt, cfg.data, files]


def _digest(*parts: Any) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


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


def _features(df: pd.DataFrame, spec: Spec, dtype: type) -> np.ndarray:
    """The feature columns as one numeric array (missing values, including pandas' NA, as NaN)."""
    try:
        return df[list(spec.features)].to_numpy(dtype=dtype, na_value=np.nan)
    except (TypeError, ValueError) as e:  # a column typed numeric by its first rows but not in this partition
        raise DataError(f"--features: a feature column holds values that are not numbers ({_first_line(e)}); "
                        "clean the data or leave the column out of --features") from None


def _fill(x: np.ndarray, fillna: float | None) -> np.ndarray:
    # Only NaN: infinities are refused by the statistics, not silently turned into huge numbers.
    return np.where(np.isnan(x), fillna, x) if fillna is not None else x


def _categorical(label: pd.Series) -> bool:
    """Labels that name classes under ``--task auto``: integers, booleans, strings."""
    return not pd.api.types.is_float_dtype(label.dtype) and not pd.api.types.is_complex_dtype(label.dtype)


def summarize(df: pd.DataFrame, spec: Spec) -> dict[str, Any]:
    """Per-partition statistics: train count, mean, M2; validation count; labels; missing values."""
    x_all = _features(df, spec, np.float64)
    val = is_validation(df[ROW_ID].to_numpy(), spec.val_fraction, spec.seed)
    x = _fill(x_all[~val], spec.fillna)
    n = len(x)
    mean = x.mean(axis=0) if n else np.zeros(x.shape[1])
    m2 = ((x - mean) ** 2).sum(axis=0) if n else np.zeros(x.shape[1])
    label = df[spec.label]
    categorical = _categorical(label)
    classes = np.unique(label.dropna().to_numpy()) if categorical or spec.task == "classification" else None
    return {"n": n, "val": int(val.sum()), "mean": mean, "m2": m2, "classes": classes,
            "nan": int(np.isnan(x_all).sum()), "inf": int(np.isinf(x_all).sum()),
            "label_nan": int(label.isna().sum()), "categorical": categorical}


def prepare(df: pd.DataFrame, spec: Spec, split: str) -> Arrays:
    """A partition's rows of one split as standardised float32 features and label indexes."""
    label = df[spec.label]
    labels = label.to_numpy() if spec.classes else label.to_numpy(dtype=np.float32, na_value=np.nan)
    return _prepare(df[ROW_ID].to_numpy(dtype=np.int64), _features(df, spec, np.float32), labels, spec, split)


def _prepare(row_id: np.ndarray, x: np.ndarray, label: np.ndarray, spec: Spec, split: str) -> Arrays:
    """The rows of ``split`` from a partition's row ids, float32 features and labels (targets as float32)."""
    val = is_validation(row_id, spec.val_fraction, spec.seed)
    keep = val if split == "val" else ~val
    # Select rows on the numpy arrays, not on the DataFrame (which would copy every column first),
    # and standardise in place: this runs for every partition of every epoch.
    x = _fill(x[keep], spec.fillna)
    x -= np.asarray(spec.mean, dtype=np.float32)
    x /= np.asarray(spec.std, dtype=np.float32)
    if spec.classes:
        labels = label[keep]
        y = pd.Index(spec.classes).get_indexer(labels)
        if (y < 0).any():
            bad = labels[y < 0][0]
            raise DataError(f"--label: value {bad!r} is not one of the {len(spec.classes)} classes in the statistics; "
                            "the data changed since they were computed: use the same --data or --resume never")
        y = y.astype(np.int64)
    else:
        y = label.astype(np.float32, copy=False)[keep]
    return Arrays(np.ascontiguousarray(x, dtype=np.float32), y, row_id[keep])


def _plain_numbers(column: pa.ChunkedArray) -> bool:
    """Integers or floats without nulls: what numpy holds as they are, the common case of every column."""
    return (pa.types.is_integer(column.type) or pa.types.is_floating(column.type)) and column.null_count == 0


def prepare_table(table: pa.Table, spec: Spec, split: str) -> Arrays:
    """:func:`prepare` from an Arrow table: the same arrays, without the detour through pandas.

    Plain numeric columns (no nulls) go from Arrow to one float32 array directly; any other table goes
    through pandas (:func:`prepare`), which knows every type and how missing values read.
    """
    features = [table.column(f) for f in spec.features]
    label = table.column(spec.label)
    if not all(_plain_numbers(c) for c in features) or not _plain_numbers(label):
        return prepare(table.to_pandas(), spec, split)
    # Columns stacked (contiguous copies), then one transposing copy: far faster than writing each
    # column into a strided slice of a row-major array.
    x = np.stack([c.to_numpy() for c in features]).astype(np.float32, copy=False).T
    return _prepare(table.column(ROW_ID).to_numpy().astype(np.int64, copy=False), x, label.to_numpy(), spec, split)


def take_from(parts: list[Arrays], idxs: list[np.ndarray]) -> Arrays:
    """Rows ``idxs[i]`` of ``parts[i]``, concatenated: runs on the worker holding the partitions, so one
    task serves a whole request's rows there.

    Each partition's rows go straight into the result (``np.take(..., out=)``): taking them apart and
    concatenating allocated and faulted in every row twice: 14.5 ms against 3.6 for 58k rows of 32 features.
    """
    n = sum(len(i) for i in idxs)
    first = parts[0]
    out = Arrays(np.empty((n, *first.x.shape[1:]), first.x.dtype), np.empty(n, first.y.dtype),
                 np.empty(n, first.row_id.dtype))
    start = 0
    for p, i in zip(parts, idxs, strict=True):
        rows = slice(start, start + len(i))
        p.take_into(i, Arrays(out.x[rows], out.y[rows], out.row_id[rows]))
        start += len(i)
    return out


@dataclass(frozen=True)
class PartGraph:
    """A partition's own task graph, carried as a plain argument so that Dask does not schedule it apart."""

    graph: dict[Any, Any]
    key: Any

    @staticmethod
    def of(part: Delayed) -> PartGraph:
        return PartGraph(dict(part.dask), part.key)


def prepare_part(part: PartGraph, spec: Spec, split: str) -> Arrays:
    """Read a partition and prepare it in one task.

    As two tasks (the read, then ``prepare``), each pass over the data paid the worker's per-task costs
    twice per partition, and the read frame was stored and sized only to be dropped: one task took 15%
    less worker CPU per epoch on 2 cores.
    """
    return prepare(get_sync(part.graph, part.key), spec, split)


def prepare_file(path: str, columns: tuple[str, ...], rows: int, offset: int | None, spec: Spec, split: str) -> Arrays:
    """A Parquet file's rows of ``split``, read and prepared in one task (see :func:`prepare_part`)."""
    return prepare_table(read_parquet_table(path, columns, rows, offset), spec, split)


def _with_row_ids(df: pd.DataFrame, offsets: list[int], partition_info: dict[str, Any] | None = None) -> pd.DataFrame:
    start = offsets[partition_info["number"]] if partition_info else 0
    df = df.copy()
    df[ROW_ID] = np.arange(start, start + len(df), dtype=np.int64)
    return df


def _own_graphs(parts: list[Delayed]) -> list[Delayed]:
    """Each partition with only its own tasks in its graph.

    ``to_delayed`` gives every partition the graph of the whole collection, which the client would
    cull again for every request: O(partitions) work per request. Culling once here keeps it O(1).
    """
    return [Delayed(d.key, dict(d.dask.cull({d.key}))) if isinstance(d.dask, HighLevelGraph) else d for d in parts]


# -- the dataset as seen by a rank ----------------------------------------------------------------------


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

    def __init__(self, ddf: dd.DataFrame, cfg: DataConfig, seed: int, identity: Any = None,
                 files: list[str] | None = None):
        """``identity``: what the data is, for the fingerprint, when not every file of ``--data`` (--follow).
        ``files``: the Parquet file behind each partition of ``ddf`` (a ``parquet_source``)."""
        self.cfg = cfg
        self.seed = seed
        fmt = data_format(cfg)
        assert files is None or len(files) == ddf.npartitions, "one partition per Parquet file"
        # One partition per file: training reads each with pyarrow, straight to numpy (Dataset.partitions).
        self._files = files
        self.label = ARRAY_LABEL if fmt in ("npy", "zarr") else cfg.label
        self.features = _select_features(ddf, cfg, self.label)
        _check_label_and_ids(ddf, cfg, self.label)
        # Only the columns used: Parquet then reads nothing else.
        ddf = ddf[[c for c in (ROW_ID, *self.features, self.label) if c in ddf.columns]]
        self.columns = tuple(map(str, ddf.columns))  # as read from each file (--follow)
        self.own_ids = ROW_ID in ddf.columns
        if ROW_ID not in ddf.columns:
            # Row ids are the rows' global positions; they need the partitions' lengths first.
            with read_errors(_where(cfg)):
                if self._files is not None:  # the footers say: no pass over the data
                    lengths = list(dask.compute(*[dask.delayed(parquet_rows, pure=False)(f) for f in self._files]))
                else:
                    lengths = ddf.map_partitions(len).compute().tolist()
            offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(int).tolist()
            ddf = ddf.map_partitions(_with_row_ids, offsets, meta={**ddf.dtypes.to_dict(), ROW_ID: np.int64})
        self.ddf = ddf
        self._parts: list[Delayed] = _own_graphs(list(ddf.to_delayed()))
        schema = {str(c): str(t) for c, t in ddf.dtypes.items()}
        what = _identity(cfg, fmt) if identity is None else identity
        self.token = _digest(what, schema, ddf.npartitions, self.features, self.label, cfg.val_fraction,
                             seed, cfg.fillna)[:32]
        self.stats: Stats | None = None
        self._spec = Spec(tuple(self.features), self.label, cfg.val_fraction, seed, cfg.fillna, cfg.task)

    @property
    def num_partitions(self) -> int:
        return len(self._parts)

    def compute_stats(self) -> Stats:
        """Counts, standardisation and class set, computed by the workers partition by partition."""
        with read_errors(_where(self.cfg)):
            summaries = dask.compute(*[dask.delayed(summarize)(p, self._spec) for p in self._parts])
        self.stats = self._combine(list(summaries))
        return self.stats

    def _combine(self, summaries: list[dict[str, Any]]) -> Stats:
        n = sum(s["n"] for s in summaries)
        val = sum(s["val"] for s in summaries)
        where = _where(self.cfg)
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
        if self._files is not None:
            assert self.stats is not None
            rows = [t + v for t, v in zip(self.stats.train_sizes, self.stats.val_sizes, strict=True)]
            offsets: list[int | None] = [None] * len(rows) if self.own_ids else list(number_rows(rows, 0))
            return self._file_partitions(list(zip(self._files, rows, offsets, strict=True)), split)
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
