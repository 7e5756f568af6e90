"""Early stopping on a held-out metric, and which evaluation's model is the best (``--early-stop``,
``--monitor``), as Keras' ``EarlyStopping`` and Lightning's ``ModelCheckpoint(monitor=)`` do.

``Monitor`` is an immutable value: ``update`` returns a new one. The training state holds it (and the
best model) by replacement, never mutated in place, so an elastic commit keeps the monitor of its
moment and a rollback returns to it; checkpoints carry ``to_dict()``, so a resumed run stops where an
uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from dtrain.config import UserError

MONITORS = ("eval_loss", "eval_accuracy", "eval_r2")


def higher_is_better(metric: str) -> bool:
    return metric in ("eval_accuracy", "eval_r2")


@dataclass(frozen=True)
class Monitor:
    """The best value of ``metric`` seen, at which step, and evaluations since without improvement."""

    metric: str = "eval_loss"
    patience: int | None = None  # evaluations without improvement that stop training (None: never)
    best: float | None = None
    best_step: int | None = None
    waited: int = 0
    last_step: int | None = None  # the step of the last evaluation seen

    def improves(self, value: float) -> bool:
        if math.isnan(value):
            return False
        if self.best is None:
            return True
        return value > self.best if higher_is_better(self.metric) else value < self.best

    def update(self, metrics: dict[str, float], step: int) -> Monitor:
        """The monitor after an evaluation at ``step`` gave ``metrics``."""
        if self.metric not in metrics:
            raise UserError(f"--monitor: this run's evaluation has no {self.metric} (it has "
                            f"{', '.join(k for k in metrics if k in MONITORS)}); monitor one of those")
        value = float(metrics[self.metric])
        if self.improves(value):
            return dataclasses.replace(self, best=value, best_step=step, waited=0, last_step=step)
        return dataclasses.replace(self, waited=self.waited + 1, last_step=step)

    @property
    def improved(self) -> bool:
        """Whether the last evaluation was the best so far."""
        return self.last_step is not None and self.best_step == self.last_step

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.waited >= self.patience

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def resume(cls, metric: str, patience: int | None, saved: dict[str, Any] | None) -> Monitor:
        """The monitor for ``metric`` and ``patience`` (this run's flags), continuing ``saved`` (a
        checkpoint's) when it watched the same metric; a fresh one otherwise."""
        fresh = cls(metric, patience)
        if not saved or saved.get("metric") != metric:
            return fresh
        return dataclasses.replace(fresh, **{k: saved[k] for k in ("best", "best_step", "waited", "last_step")
                                             if k in saved})
