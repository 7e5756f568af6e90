"""Where rows come from: the formats of ``--data``, listing it, reading Parquet, generated data.

Sources: Parquet (directory, glob or fsspec URL), CSV (file, directory or glob), ``.npy`` (features file
plus ``--label y.npy``), zarr (a group with arrays ``x`` and ``y``), or the generated default, each a
lazy Dask DataFrame with one partition per file (Parquet) or per block of rows. Every problem with the
data reaches the user as one :class:`~dtrain.errors.UserError` line naming the flag and the fix;
problems found by a worker are raised there as :class:`~dtrain.errors.DataError`.

I/O lives here, in the readers the workers call (``read_parquet_table``) and in ``arrays.py`` (the
``.npy`` and zarr readers); the pure work on the rows is in ``prepare.py``, the dataset a rank sees in
``dataset.py``.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import dask.dataframe as dd
import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from dtrain.config import DataConfig
from dtrain.data.follow import FileInfo, ignored
from dtrain.errors import DataError, UserError, first_line

log = logging.getLogger(__name__)

ROW_ID = "row_id"
ARRAY_LABEL = "label"  # the label column of array sources (npy, zarr: dtrain/data/arrays.py), whatever --label says


FORMATS = ("parquet", "csv", "npy", "zarr")


_PARQUET_EXT = (".parquet", ".pq", ".parq")


# -- generated data --------------------------------------------------------------------------------


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


# -- finding the files -----------------------------------------------------------------------------


def _fs(path: str) -> tuple[fsspec.AbstractFileSystem, str]:
    try:
        return fsspec.core.url_to_fs(path)
    except (ImportError, ValueError) as e:  # an unknown protocol, or its package is missing
        raise UserError(f"--data: cannot open {path!r} ({first_line(e)}); check the URL or install "
                        "the fsspec package for its protocol") from None


_SUFFIXES = (("parquet", _PARQUET_EXT), ("csv", (".csv", ".csv.gz")), ("npy", (".npy",)), ("zarr", (".zarr",)))


@dataclass(frozen=True)
class Source:
    """``--data`` as listed, once: its format, its data files and what it is, for the fingerprint.

    Made by :func:`list_source` (or, ``--follow``, from the files present at the first start); the
    Dataset, the fingerprint and ``--follow`` take it rather than listing ``--data`` again (an object
    store answers every listing slowly, and a directory being written to could answer differently).
    """

    data: str | None  # --data; None: the generated data
    format: str | None  # one of FORMATS; None: the generated data
    files: tuple[FileInfo, ...]  # the data files (parquet, csv, npy), in reading order, with mtime and size
    identity: tuple[Any, ...]  # what the data is (generator parameters, or every name, size and date)

    @property
    def paths(self) -> list[str]:
        return [f.path for f in self.files]


def _listing(path: str) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """What ``path`` names (a glob may name many), and every file under those names with its details.

    One listing with details, not a request per file: object stores answer slowly.
    """
    fs, root = _fs(path)
    try:
        if fs.exists(root):
            found = {root: fs.info(root)}
        elif any(c in root for c in "*?["):
            found = fs.glob(root, detail=True)
        else:
            return [], {}
        infos: dict[str, dict[str, Any]] = {}
        for name, info in sorted(found.items()):
            inside = fs.find(name, detail=True) if info.get("type") == "directory" else {name: info}
            infos.update(sorted(inside.items()))
    except OSError as e:
        raise UserError(f"--data: cannot list {path!r} ({first_line(e)}); check the path and credentials") from None
    return sorted(found), infos


def _guess_format(cfg: DataConfig, matches: list[str], infos: dict[str, dict[str, Any]]) -> str:
    assert cfg.data is not None
    if cfg.format != "auto":
        return cfg.format
    names = [str(n).rstrip("/") for n in matches]
    if len(matches) == 1 and not names[0].endswith(".zarr") and names[0] not in infos:  # one directory
        root = names[0]
        # The directory's own entries: a file, or the first component of a path below it.
        names = sorted({root + "/" + n[len(root) + 1:].split("/")[0] for n in infos if n.startswith(root + "/")})
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


def _when(info: dict[str, Any]) -> str:
    return str(next((info[k] for k in ("mtime", "LastModified", "updated", "ETag") if k in info), None))


def list_source(cfg: DataConfig) -> Source:
    """List ``--data`` once: its format (``--format``, else guessed from the names), files and identity.

    The identity is what the fingerprint hashes: the generator's parameters, or every file's name, size
    and date. Dask's own tokens for file sources differ between processes, so they cannot name partitions
    that every rank shares, nor tell whether a checkpoint was trained on this data.
    """
    if cfg.data is None:
        return Source(None, None, (), ("generated", cfg.gen_rows, cfg.gen_features, cfg.gen_classes,
                                        cfg.gen_partitions, cfg.gen_noise))
    matches, infos = _listing(cfg.data)
    if not matches:
        raise UserError(f"--data: no such file or directory {cfg.data!r}; check the path")
    fmt = _guess_format(cfg, matches, infos)
    listed = [infos]
    if fmt == "npy":
        listed.append(_listing(cfg.label)[1])
    identity = [[name, info.get("size"), _when(info)] for one in listed
                for name in sorted(one)[:10000]  # capped: a zarr store has a file per chunk
                for info in [one[name]]]
    files: tuple[FileInfo, ...] = ()
    if fmt in ("parquet", "csv"):
        files = _data_files(cfg, fmt, infos)
    elif fmt == "npy":
        files = tuple(FileInfo(n, _mtime(infos[n]), int(infos[n].get("size") or 0)) for n in sorted(infos))
    return Source(cfg.data, fmt, files, (fmt, cfg.data, identity))


def _data_files(cfg: DataConfig, fmt: str, infos: dict[str, dict[str, Any]]) -> tuple[FileInfo, ...]:
    """The data files of a listing; refuses a selection without any."""
    assert cfg.data is not None
    exts = dict(_SUFFIXES)[fmt]
    fs, _ = _fs(cfg.data)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    # Names starting with . or _ are bookkeeping (_SUCCESS, .crc), as for Spark and pyarrow.
    files = tuple(FileInfo(f if protocol in ("file", "local") else fs.unstrip_protocol(f), _mtime(info),
                           int(info.get("size") or 0))
                  for f, info in infos.items()
                  if f.endswith(exts) and not os.path.basename(f).startswith((".", "_")))
    if not files:
        raise UserError(f"--data: no {fmt} files ({', '.join(exts)}) in {cfg.data!r}; check the path or --format")
    return files


# -- Parquet, file by file (and a followed directory, listed again and again) ----------------------


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
        raise UserError(f"--follow: cannot list {source!r} ({first_line(e)}); "
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


def parquet_source(files: list[str]) -> dd.DataFrame:
    """Parquet files, one partition per file, in the order given (only the columns used are read)."""
    meta = parquet_meta(files[0])
    return dd.from_map(read_parquet_file, files, columns=tuple(map(str, meta.columns)), meta=meta,
                       enforce_metadata=False, label="dtrain-parquet")


# -- what the data is, and its errors --------------------------------------------------------------


def data_where(cfg: DataConfig) -> str:
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
        raise UserError(f"--data: cannot read {where} ({first_line(e)}); check the files and --format") from None


def frame(source: Source, cfg: DataConfig, seed: int) -> dd.DataFrame:
    """``source`` as a lazy DataFrame: one partition per Parquet file, in the listed order."""
    if source.format is None:
        return generated(cfg, seed)
    with read_errors(data_where(cfg)):
        if source.format == "parquet":
            return parquet_source(source.paths)
        if source.format == "csv":
            return dd.read_csv(source.paths, blocksize="64MB")
        from dtrain.data import arrays  # it reads ROW_ID from here

        return arrays.open_npy(cfg) if source.format == "npy" else arrays.open_zarr(cfg)


def _digest(*parts: Any) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()
