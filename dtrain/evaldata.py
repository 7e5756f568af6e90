"""``--eval-data``: a separate evaluation set in place of the hash split of ``--data``.

The training data is then used whole (``--val-fraction`` 0), and the evaluation set is read like the
training data (same readers, same columns) but prepared with the *training* split's statistics:
its own mean and std would standardise it differently from what the model learnt on.
"""

from __future__ import annotations

import dataclasses
import logging

from dask.delayed import Delayed

from dtrain import dist
from dtrain.config import Config, UserError
from dtrain.data import Stats, open_dataset

log = logging.getLogger(__name__)


def resolve(cfg: Config) -> Config:
    """``cfg`` with the training data unsplit when ``--eval-data`` names the evaluation set."""
    if cfg.data.eval_data is None or cfg.data.val_fraction == 0:
        return cfg
    log.info("--eval-data: evaluating on %s; the training data is used whole (no --val-fraction split)",
             cfg.data.eval_data)
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, val_fraction=0.0))


def partitions(cfg: Config, stats: Stats) -> tuple[list[Delayed], list[int]]:
    """The evaluation set's partitions, prepared with the training statistics, and their row counts."""
    assert cfg.data.eval_data is not None
    label = cfg.data.eval_label or cfg.data.label
    if label == cfg.data.label and label.endswith(".npy"):  # the training rows' labels cannot be these rows'
        raise UserError(f"--eval-label: with .npy evaluation data, name its labels file (--eval-label "
                        f"y_eval.npy); {label!r} holds the labels of --data")
    data_cfg = dataclasses.replace(cfg.data, data=cfg.data.eval_data, label=label, features=list(stats.features),
                                   task=stats.task, val_fraction=0.0, follow=False, eval_data=None, eval_label=None)
    try:
        dataset = open_dataset(data_cfg, cfg.train.seed)
        own = dist.run_on_main(dataset.compute_stats, name="eval-stats")  # counts and checks, on the workers
    except UserError as e:  # the same problems as with --data, found in the evaluation set
        raise UserError(f"--eval-data: {str(e).removeprefix('--data: ')}") from None
    dataset.use_stats(dataclasses.replace(own, mean=stats.mean, std=stats.std, classes=stats.classes))
    # With no split every row of the evaluation set is on the "train" side.
    return dataset.partitions("train"), own.train_sizes
