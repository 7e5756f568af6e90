"""Preparing a partition from Arrow (``prepare_table``) gives the arrays the pandas path (``prepare``) gives.

Training reads Parquet files with pyarrow and prepares them without pandas when every column is a plain
number; anything else takes the pandas path. Both must agree to the bit: the same rows in each split,
the same standardised features, the same labels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dtrain.data.prepare import Arrays, Spec, _plain_numbers, prepare, prepare_table
from dtrain.data.sources import ROW_ID, read_parquet_table
from dtrain.errors import DataError

pytestmark = pytest.mark.unit

ROWS = 500


def _table(label: pa.Array, features: dict[str, pa.Array] | None = None) -> pa.Table:
    rng = np.random.default_rng(0)
    cols = features or {"a": pa.array(rng.normal(size=ROWS).astype(np.float32)),
                        "b": pa.array(rng.normal(size=ROWS)),  # float64
                        "c": pa.array(rng.integers(-5, 5, size=ROWS, dtype=np.int32))}
    return pa.table({ROW_ID: pa.array(np.arange(1000, 1000 + ROWS, dtype=np.int64)), **cols, "label": label})


def _spec(table: pa.Table, classes: tuple[object, ...] = (), fillna: float | None = None) -> Spec:
    features = tuple(c for c in table.column_names if c not in (ROW_ID, "label"))
    return Spec(features, "label", 0.2, 3, fillna, "classification" if classes else "regression",
                mean=tuple(0.5 for _ in features), std=tuple(2.0 for _ in features), classes=classes)


def _same(a: Arrays, b: Arrays) -> None:
    np.testing.assert_array_equal(a.row_id, b.row_id)
    np.testing.assert_array_equal(a.x, b.x)
    np.testing.assert_array_equal(a.y, b.y)
    assert a.x.dtype == b.x.dtype == np.float32 and a.x.flags.c_contiguous
    assert a.y.dtype == b.y.dtype


@pytest.mark.parametrize("split", ["train", "val"])
def test_plain_numbers_take_the_arrow_path_and_match_pandas(split: str) -> None:
    labels = np.random.default_rng(1).integers(0, 4, size=ROWS)
    table = _table(pa.array(labels))
    assert all(_plain_numbers(table.column(c)) for c in table.column_names)
    spec = _spec(table, classes=(0, 1, 2, 3))
    out = prepare_table(table, spec, split)
    _same(out, prepare(table.to_pandas(), spec, split))
    assert 0 < len(out) < ROWS  # a real split: some rows in each
    regression = _table(pa.array(labels.astype(np.float64) / 3))
    spec = _spec(regression)
    _same(prepare_table(regression, spec, split), prepare(regression.to_pandas(), spec, split))


def test_other_columns_take_the_pandas_path() -> None:
    # String labels, and a feature with missing values filled by --fillna.
    table = _table(pa.array(np.array(["x", "y"])[np.arange(ROWS) % 2]))
    spec = _spec(table, classes=("x", "y"))
    assert not _plain_numbers(table.column("label"))
    _same(prepare_table(table, spec, "train"), prepare(table.to_pandas(), spec, "train"))
    with_gaps = pa.array([None if i % 7 == 0 else float(i) for i in range(ROWS)])
    gaps = _table(pa.array(np.arange(ROWS) % 3), {"a": with_gaps})
    spec = _spec(gaps, classes=(0, 1, 2), fillna=-1.0)
    assert not _plain_numbers(gaps.column("a"))
    out = prepare_table(gaps, spec, "train")
    _same(out, prepare(gaps.to_pandas(), spec, "train"))
    assert not np.isnan(out.x).any()


def test_a_label_outside_the_classes_is_an_error_on_both_paths() -> None:
    table = _table(pa.array(np.arange(ROWS) % 5))
    spec = _spec(table, classes=(0, 1, 2, 3))
    for prep in (lambda: prepare_table(table, spec, "train"), lambda: prepare(table.to_pandas(), spec, "train")):
        with pytest.raises(DataError, match="not one of the 4 classes"):
            prep()


def test_read_parquet_table_numbers_rows_and_refuses_changed_files(tmp_path: Path) -> None:
    path = tmp_path / "f.parquet"
    pq.write_table(_table(pa.array(np.zeros(ROWS, dtype=np.int64))).drop_columns([ROW_ID]), path)
    table = read_parquet_table(str(path), ("a", "label"), ROWS, offset=70)
    assert table.column_names == ["a", "label", ROW_ID]
    np.testing.assert_array_equal(table.column(ROW_ID).to_numpy(), np.arange(70, 70 + ROWS))
    with pytest.raises(DataError, match="changed after it was read"):
        read_parquet_table(str(path), ("a",), ROWS + 1)
    with pytest.raises(DataError, match="has no column 'zz'"):
        read_parquet_table(str(path), ("a", "zz"))
