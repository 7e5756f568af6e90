"""Training, in the order a step meets it:

* ``trainer.py``: ``Trainer``, the run (set-up, ``fit``, ``finish``) and what a checkpoint holds;
* ``step.py``: one optimizer step (optimizer, forward/backward, the gradient combine, the step's counts);
* ``schedule.py``: the LR schedule and the steps left;
* ``evaluate.py``: held-out loss and accuracy;
* ``meter.py``: running sums between metrics lines.

The decisions each step takes are the coordinator's step policy (``dtrain/policy.py``).
"""

from __future__ import annotations

from typing import Any

__all__ = ["Trainer"]


def __getattr__(name: str) -> Any:
    # Trainer imported on first use: the step alone (benchmarks/peers/dtrain_step.py, unit tests) needs
    # neither Dask nor the cluster code the trainer brings in.
    if name == "Trainer":
        from dtrain.train.trainer import Trainer

        return Trainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
