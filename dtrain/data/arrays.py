"""Array sources: ``.npy`` (a features file plus ``--label y.npy``) and zarr (a group with arrays ``x`` and
``y``), each a lazy Dask DataFrame of blocks of rows with feature columns ``f0``, ``f1``, ... and the label
column ``label``. Every task opens its block by location, so the graph pickles small.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import dask.dataframe as dd
import numpy as np
import pandas as pd

from dtrain.config import DataConfig
from dtrain.data.sources import ARRAY_LABEL, ROW_ID
from dtrain.errors import UserError, first_line

# Rows of an array source per partition: big enough that per-task overhead is small, small enough
# that a shuffle window of a few partitions stays a few tens of MB on the cluster.
ARRAY_PARTITION_BYTES = 16 * 2**20


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


def open_npy(cfg: DataConfig) -> dd.DataFrame:
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
        raise UserError(f"--data: cannot load {cfg.data!r} or {cfg.label!r} as .npy ({first_line(e)}); "
                        "save them with numpy.save") from None


def open_zarr(cfg: DataConfig) -> dd.DataFrame:
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
        raise UserError(f"--data: cannot open {cfg.data!r} as a zarr group ({first_line(e)}); "
                        "pass a zarr group holding arrays x and y") from None
    if "x" not in arrays:
        raise UserError(f"--data: no array 'x' in {cfg.data!r} (arrays: {', '.join(arrays) or 'none'}); "
                        "store the features as array x")
    label = cfg.label if cfg.label in arrays else "y" if cfg.label == "label" and "y" in arrays else None
    if label is None:
        raise UserError(f"--label: no array {cfg.label!r} in {cfg.data!r} (arrays: {', '.join(arrays)}); "
                        "pass --label NAME of the label array")
    return _array_frame(ArraySource("zarr", cfg.data, label), cfg)
