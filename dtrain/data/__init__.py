"""Rows, from where they lie to a rank's batch, in the order they travel:

* ``sources.py``: the formats of ``--data``, listing it once (``Source``), reading files, generated data (I/O);
* ``prepare.py``: the pure numpy work the Dask workers do per partition (statistics, standardised
  arrays of one split, a request's rows);
* ``dataset.py``: ``Dataset``, the lazy partitions of each split keyed alike on every rank, and
  ``Stats``, their statistics;
* ``plan.py``: the epoch plan (pure): which rows make each global batch, and each rank's share;
* ``stream.py``: a rank's batches from the cluster, with bounded prefetch;
* ``follow.py``: ``--follow``: which new Parquet files to read, in which order, and waiting for them.

The names other modules use are importable from ``dtrain.data`` itself.
"""

from dtrain.data.dataset import Dataset, Stats, open_dataset
from dtrain.data.prepare import Arrays, Spec, is_validation, prepare, prepare_table
from dtrain.data.sources import ROW_ID, Source, follow_root, generated, list_parquet, list_source, parquet_source
from dtrain.errors import DataError

__all__ = ["ROW_ID", "Arrays", "DataError", "Dataset", "Source", "Spec", "Stats", "follow_root", "generated",
           "is_validation", "list_parquet", "list_source", "open_dataset", "parquet_source", "prepare",
           "prepare_table"]
