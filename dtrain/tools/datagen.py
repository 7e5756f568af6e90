"""Write the synthetic dataset as partitioned Parquet, for ``dtrain --data DIR``.

    python -m dtrain.datagen --out data/synth --rows 10000000 --features 32 --partitions 64

The rows come from the same generator as dtrain's default data (``dtrain.data.generated``): with the
same ``--seed``, rows, features, classes, noise and partitions, ``--data DIR`` trains on exactly the rows
the default would generate. One Dask task per partition generates it and writes ``part-NNNNN.parquet``,
so memory stays at a few partitions whatever the total size.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from dtrain.cli import _fail, _Parser
from dtrain.config import ClusterConfig, DataConfig, UserError

if TYPE_CHECKING:
    import pandas as pd

# dask, pandas and pyarrow are imported where used: bad arguments are answered before those seconds.

log = logging.getLogger(__name__)

PROG = "python -m dtrain.datagen"
# A partition is generated in float64 before it is written; above this many bytes, warn about memory.
LARGE_PARTITION_BYTES = 512 * 2**20


def _at_least(lower: int) -> Any:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < lower:
            raise argparse.ArgumentTypeError(f"must be >= {lower}, got {value}")
        return value

    return parse


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    d = DataConfig()  # the defaults of dtrain's generated data
    p = _Parser(prog=PROG, description="Write dtrain's synthetic classification data as partitioned Parquet "
                "(one part-NNNNN.parquet per partition, with a row_id column), generated in parallel by Dask.")
    p.add_argument("--out", required=True, help="output directory or fsspec URL (must be empty or absent)")
    p.add_argument("--rows", type=_at_least(1), default=d.gen_rows, help=f"rows (default: {d.gen_rows})")
    p.add_argument("--features", type=_at_least(1), default=d.gen_features,
                   help=f"feature columns f0..fN-1 (default: {d.gen_features})")
    p.add_argument("--classes", type=_at_least(2), default=d.gen_classes, help=f"classes (default: {d.gen_classes})")
    p.add_argument("--partitions", type=_at_least(1), default=d.gen_partitions,
                   help=f"partitions, one file each (default: {d.gen_partitions})")
    p.add_argument("--seed", type=_at_least(0), default=0, help="seed; dtrain --seed S generates the same (default: 0)")
    p.add_argument("--noise", type=_non_negative, default=d.gen_noise,
                   help=f"noise around the class clusters (default: {d.gen_noise})")
    p.add_argument("--scheduler", default=None,
                   help="Dask scheduler address (tcp://HOST:PORT); default: threads in this process")
    p.add_argument("--overwrite", action="store_true", help="replace the part-*.parquet files already in --out")
    return p


def _write_partition(df: pd.DataFrame, path: str) -> int:
    """Write one partition as one Parquet file (runs on a Dask worker); returns its rows."""
    import fsspec
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(df, preserve_index=False)
    with fsspec.open(path, "wb") as f:
        # Dictionary-encoding random floats is futile: 20x slower writes and bigger files. Labels gain.
        pq.write_table(table, f, use_dictionary=["label"])
    return len(df)


def _prepare_out(out: str, overwrite: bool) -> None:
    """Create ``out``; refuse to mix with existing files unless told to replace our own."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(out)
    if fs.exists(root) and not fs.isdir(root):
        raise UserError(f"--out: {out!r} is a file; choose a directory")
    existing = fs.ls(root, detail=False) if fs.exists(root) else []
    ours = [f for f in existing if os.path.basename(str(f)).startswith("part-") and str(f).endswith(".parquet")]
    if existing and not overwrite:
        raise UserError(f"--out: {out!r} is not empty; choose a new directory or pass --overwrite")
    if len(ours) != len(existing):
        raise UserError(f"--out: {out!r} holds files other than part-*.parquet; choose a new directory")
    for f in ours:
        fs.rm(f)
    fs.makedirs(root, exist_ok=True)


@contextlib.contextmanager
def _scheduler(address: str | None) -> Iterator[None]:
    import dask

    if address is None:
        # numpy's generators and Parquet's encoder release the GIL: threads run partitions in parallel.
        with dask.config.set(scheduler="threads"):
            yield
        return
    from dtrain.cluster import connect

    with connect(ClusterConfig(scheduler=address)):
        yield


def write(out: str, rows: int, features: int, classes: int, partitions: int, seed: int = 0, noise: float = 2.0,
          overwrite: bool = False, scheduler: str | None = None) -> list[str]:
    """Generate and write the dataset; returns the files written, in partition order."""
    import dask

    from dtrain.data import generated

    cfg = DataConfig(gen_rows=rows, gen_features=features, gen_classes=classes, gen_partitions=partitions,
                     gen_noise=noise)
    ddf = generated(cfg, seed)
    part_bytes = rows / ddf.npartitions * features * 8 * 3
    if part_bytes > LARGE_PARTITION_BYTES:
        log.warning("about %.1f GiB per partition while generating; pass more --partitions to use less memory",
                    part_bytes / 2**30)
    _prepare_out(out, overwrite)
    base = out.rstrip("/")
    files = [f"{base}/part-{i:05d}.parquet" for i in range(ddf.npartitions)]
    tasks = [dask.delayed(_write_partition)(part, path) for part, path in zip(ddf.to_delayed(), files, strict=True)]
    with _scheduler(scheduler):
        written = dask.compute(*tasks)
    assert sum(written) == rows, (sum(written), rows)
    return files


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=os.environ.get("DTRAIN_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    args = build_parser().parse_args(argv)
    t0 = time.perf_counter()
    try:
        files = write(args.out, args.rows, args.features, args.classes, args.partitions, args.seed, args.noise,
                      args.overwrite, args.scheduler)
    except UserError as e:
        _fail(str(e))
    except OSError as e:
        _fail(f"--out: cannot write {args.out!r} ({e}); choose a writable directory")
    log.info("wrote %d rows x %d features in %d files to %s in %.1fs", args.rows, args.features, len(files),
             args.out, time.perf_counter() - t0)


if __name__ == "__main__":
    main()
