"""Training, in the order a step meets it:

* ``trainer.py``: ``Trainer``, the run (set-up, ``fit``, ``finish``) and what a checkpoint holds;
* ``step.py``: one optimizer step (optimizer, forward/backward, the gradient combine, the step's counts);
* ``schedule.py``: the LR schedule and the steps left;
* ``evaluate.py``: held-out loss and accuracy;
* ``meter.py``: running sums between metrics lines.

The decisions each step takes are the coordinator's step policy (``dtrain/policy.py``).
"""

from dtrain.train.trainer import Trainer

__all__ = ["Trainer"]
