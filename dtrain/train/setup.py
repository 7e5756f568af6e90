"""Before the loop: the checks that need the world or the data, the run directory's name, the data opened.

Apart from ``trainer.py`` because none of it depends on the trainer's state: each takes the config
(and the coordinator, which knows the checkpoint to resume from).
"""

from __future__ import annotations

import datetime
import os
from typing import Any

from dtrain import dist
from dtrain.config import Config
from dtrain.coordinator import Coordinator
from dtrain.data.dataset import Dataset
from dtrain.data.follow import Feed, FileInfo, arrival_order
from dtrain.data.sources import Source, follow_root, list_parquet, list_source
from dtrain.errors import UserError


def check_elastic(cfg: Config) -> None:
    if not dist.is_elastic():
        return
    if cfg.cluster.scheduler is None:
        raise UserError("--scheduler: elastic runs need a Dask cluster that outlives any rank; start one "
                        "(launch/dask_cluster.sh) and pass --scheduler tcp://HOST:PORT")
    if cfg.run.run_dir is None:
        raise UserError("--run-dir: elastic runs need an explicit run directory, shared by all hosts")
    if cfg.data.follow:
        raise UserError("--follow: not supported with elastic runs yet; run it on a fixed world "
                        "(horovodrun -np N without --min-np/--max-np)")


def check_follow(cfg: Config) -> None:
    """What --follow needs of --data, checked before any cluster starts."""
    if not cfg.data.follow:
        return
    assert cfg.data.data is not None
    source = follow_root(cfg.data.data)
    if list_source(cfg.data).format != "parquet":
        raise UserError(f"--follow: --data {source!r} does not hold Parquet files; write the stream as "
                        "Parquet (.parquet) files")


def run_dir_path(cfg: Config) -> str:
    def choose() -> str:
        return cfg.run.run_dir or os.path.join("runs", datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))

    return dist.run_on_main(choose, name="run-dir")


def open_data(cfg: Config, coord: Coordinator) -> tuple[Dataset, dict[str, Any] | None, list[FileInfo] | None]:
    """The dataset, the checkpoint to resume from (if any) and, with ``--follow``, the first files.

    A followed directory grows, so its dataset is the files present at the *first* start (listed by rank
    0, or recorded in the checkpoint): the statistics, the fingerprint and the row numbering stay those
    of the first run whatever landed since.
    """
    if not cfg.data.follow:
        dataset = Dataset.open(cfg.data, cfg.train.seed)
        return dataset, coord.resume(dataset.token), None
    assert cfg.data.data is not None
    source = cfg.data.data
    resumed = coord.resume(None)  # the fingerprint is checked once the first files are known
    if resumed is not None and resumed.get("follow"):
        infos = [FileInfo(f.path, f.mtime, f.size) for f in Feed.from_dict(resumed["follow"]).segments[0]]
    else:
        infos = dist.run_on_main(lambda: arrival_order(list_parquet(source)), name="follow-list")
        if not infos:
            raise UserError(f"--follow: no Parquet files in {source!r} yet; the statistics come from the files "
                            "present at start: start once the first file has landed")
    # The Source is these files, not a fresh listing of the directory.
    listed = Source(source, "parquet", tuple(infos), ("follow", source, [[f.path, f.size, f.mtime] for f in infos]))
    dataset = Dataset.open(cfg.data, cfg.train.seed, listed)
    coord.check_fingerprint(resumed, dataset.token)
    return dataset, resumed, infos
