"""What each training step does, decided apart from doing it: a pure policy, unit-tested without a cluster.

The coordinator's decisions at step granularity live here, as dask keeps a worker's decisions in a
state machine apart from its I/O (``distributed/worker_state_machine.py``): given where training stands,
``StepPolicy`` says whether this step combines the ranks' counts (sync), writes a metrics line, commits
the elastic state, may checkpoint, and whether the loop stops; ``scheduler_wait`` whether the ranks
wait on for a lost Dask scheduler; ``stop_reason`` says why a run ended. The trainer
(``dtrain/train/trainer.py``) asks and acts; the clock-driven part of "is a checkpoint due"
(``--checkpoint-seconds``) stays with ``Coordinator.due``, which is consulted only where this policy
allows a checkpoint (after a sync, when every rank holds the same model).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

StopReason = Literal["epochs", "end_of_data", "max_steps", "max_samples", "idle_timeout", "early_stop", "diverged"]


@dataclass(frozen=True)
class StepPolicy:
    """The step decisions of one (re)start of the loop; ``global_step`` counts steps done before this one."""

    total_steps: int  # the step after which training ends
    sync_every: int = 1  # --sync-every: >1 is local SGD (the ranks combine every k steps)
    log_every: int = 1  # --log-every
    commit_every: int = 1  # --commit-every (elastic runs)
    elastic: bool = False
    follow: bool = False  # --follow: every segment ends with a sync and a metrics line

    def sync(self, global_step: int, last_of_epoch: bool, cut: bool) -> bool:
        """Whether the step about to run after ``global_step`` steps combines the ranks' counts (and the
        stop votes). Every step does, except between local SGD's averages; the last step does, and so
        does the last of an epoch cut short by --max-samples or (--follow) of every segment, so that
        waiting for files, and stopping after the wait, finds the ranks with the same model."""
        return (self.sync_every <= 1 or (global_step + 1) % self.sync_every == 0
                or global_step + 1 >= self.total_steps or (last_of_epoch and (self.follow or cut)))

    def log(self, global_step: int, last_of_epoch: bool, rows: int) -> bool:
        """Whether to write a metrics line after step ``global_step`` (counted from 1), with ``rows``
        rows counted since the last line."""
        return bool(rows) and (global_step % self.log_every == 0 or global_step == self.total_steps
                               or (self.follow and last_of_epoch))

    def stop(self, global_step: int, stop_voted: bool) -> bool:
        """Whether the loop ends after step ``global_step``: some rank voted to stop, or training is done."""
        return stop_voted or global_step >= self.total_steps

    def commit(self, global_step: int, synced: bool) -> bool:
        """Whether to commit the elastic state after step ``global_step`` (also where changed hosts are
        noticed); only after a sync, when every rank holds the same model."""
        return synced and self.elastic and global_step % self.commit_every == 0

    def may_checkpoint(self, synced: bool) -> bool:
        """Whether a periodic checkpoint may be taken now (``Coordinator.due`` says whether it is due)."""
        return synced


@dataclass
class Divergence:
    """``--stop-diverged``: whether the training loss has diverged, step by step.

    Diverged: the smoothed loss (a bias-corrected moving average, as fastai's recorder smooths it) above
    ``factor`` times its lowest so far, or not finite, as fastai's and Lightning's range tests stop. It
    sees the synced steps' global losses, the same numbers on every rank, so every rank decides alike
    with no collective. Not part of a checkpoint: a resumed run watches from its restart.
    """

    factor: float
    beta: float = 0.9  # as dtrain.tools.lr_find smooths the record it cuts at the same point
    _avg: float = 0.0
    _seen: int = 0
    lowest: float = float("inf")

    def update(self, loss: float) -> bool:
        """Whether the loss has diverged, with this step's global mean loss."""
        self._seen += 1
        self._avg = self.beta * self._avg + (1 - self.beta) * loss
        smoothed = self._avg / (1 - self.beta**self._seen)
        if not math.isfinite(smoothed) or smoothed > self.factor * self.lowest:
            return True
        self.lowest = min(self.lowest, smoothed)
        return False


SchedulerWait = Literal["carry_on", "stop", "wait"]


def scheduler_wait(world: int, ready: float, late: float, signals: float) -> SchedulerWait:
    """After a round of waiting for a lost Dask scheduler: carry on, stop, or wait another round.

    From sums over the ranks, the same on every rank, so all take the same turn: ``ready``, the ranks
    whose client reaches the scheduler again with a worker; ``late``, the ranks whose --scheduler-wait
    ran out; ``signals``, the ranks told to stop. Every rank must be ready to carry on: one that is
    not would stall the others at its first request.
    """
    if signals:
        return "stop"
    if ready >= world:
        return "carry_on"
    return "stop" if late else "wait"


def stop_reason(*, online: bool, samples: int, max_samples: int | None, global_step: int,
                max_steps: int | None, idle: bool, early_stopped: bool = False,
                diverged: bool = False) -> StopReason:
    """Why a run that was not stopped by a signal ended (``stop_reason`` in summary.json)."""
    if diverged:  # --stop-diverged
        return "diverged"
    if early_stopped:  # --early-stop: the monitored metric stopped improving
        return "early_stop"
    if max_samples is not None and samples >= max_samples:
        return "max_samples"
    if max_steps is not None and global_step >= max_steps:
        return "max_steps"
    if idle:
        return "idle_timeout"
    return "end_of_data" if online else "epochs"
