"""The entry point of a training run: ``run(cfg)``, which the command line calls.

The run itself is ``dtrain.train.Trainer`` (``dtrain/train/trainer.py``); this module stays as the
stable place callers reach it through.
"""

from __future__ import annotations

from typing import Any

from dtrain import evaldata
from dtrain.config import Config
from dtrain.train.trainer import Trainer


def run(cfg: Config) -> dict[str, Any]:
    """Train as ``cfg`` says; returns the summary (``summary.json``). See ``Trainer``."""
    cfg = evaldata.resolve(cfg)  # --eval-data: the training data unsplit (dtrain/evaldata.py)
    return Trainer(cfg).fit()
