"""The LR schedule and how many steps a run has left: pure functions of the config and the step.

A schedule is fitted to a number of steps at one global batch (``Schedule``); ``refit_schedule`` moves
it on without a jump when an elastic run's global batch changes with the world (``--batch-per-rank``).
``steps_left`` counts the optimizer steps from a data position to the end of the run.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from dtrain.config import Config
from dtrain.data.plan import EpochPlan, Position, limited, steps_for_samples


def schedule_progress(cfg: Config, step: int, total_steps: int, start: tuple[int, float] = (0, 0.0)) -> float:
    """How far the schedule's decay stands at ``step``: 0 at the end of warm-up, 1 at ``total_steps``.

    ``start = (step0, progress0)``: the schedule was refitted at ``step0``, where it stood at
    ``progress0``, to a new ``total_steps`` (an elastic run with ``--batch-per-rank`` whose world
    changed, and with it the number of steps left); what is left of it, ``progress0`` to 1, is spread
    evenly over the steps from ``step0`` to ``total_steps``. Never refitted, ``start`` is ``(0, 0.0)``.
    """
    o = cfg.optim
    if step < o.warmup_steps:
        return 0.0
    step0, done = start
    begin = max(step0, o.warmup_steps)
    return done + (1 - done) * (step - begin) / max(1, total_steps - begin)


Schedule = tuple[int, float, int, int]  # (step0, progress0, total steps, global batch) it was fitted to


def refit_schedule(cfg: Config, step: int, schedule: Schedule, total_steps: int, global_batch: int) -> Schedule:
    """The LR schedule to follow from ``step`` on, for a run of ``total_steps`` steps of ``global_batch``.

    * Fitted to these already: unchanged.
    * The global batch changed mid-schedule (``--batch-per-rank``, the world changed): refitted at
      ``step`` from where it stands, so the rate moves on continuously and the decay still ends on the
      last step, however many steps remain at the new batch size.
    * Otherwise (a fresh run, or resumed with other ``--max-steps``, ``--epochs`` or data, or after
      the schedule had ended): fitted anew to ``total_steps`` from step 0, as a fixed-batch run does.
    """
    step0, done, fitted_total, fitted_batch = schedule
    if (fitted_total, fitted_batch) == (total_steps, global_batch):
        return schedule
    if fitted_batch in (0, global_batch) or step >= fitted_total:
        return 0, 0.0, total_steps, global_batch
    return step, min(1.0, schedule_progress(cfg, step, fitted_total, (step0, done))), total_steps, global_batch


def lr_factor(cfg: Config, step: int, total_steps: int, start: tuple[int, float] = (0, 0.0),
              epochs_trained: float = 0.0) -> float:
    """Multiplier of ``--lr`` at ``step``: linear warm-up, then the schedule (see ``schedule_progress``).

    ``epochs_trained``: rows trained so far over the training rows (the exponential schedule per epoch).
    """
    o = cfg.optim
    if step < o.warmup_steps:
        return (step + 1) / o.warmup_steps
    progress = schedule_progress(cfg, step, total_steps, start)
    if o.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    if o.schedule == "step":  # x0.1 at each third of training
        return 0.1 ** int(min(progress, 0.999) * 3)
    if o.schedule == "invscaling":  # online learning: lr / (1 + t)^power_t, t counted after warm-up
        return float((1 + step - o.warmup_steps) ** -o.power_t)
    if o.schedule == "exponential":
        # Counted in what does not change with the world: optimizer steps (as warm-up and --max-steps
        # are), or the data trained; so a world change needs no refit, and a resume continues exactly.
        return float(o.lr_decay ** (step - o.warmup_steps if o.decay_per == "step" else epochs_trained))
    return 1.0



def steps_left(plan: Callable[[Position, int], EpochPlan], here: Position, epochs: int, global_batch: int,
               samples: int, max_samples: int | None) -> int:
    """Optimizer steps from ``here`` to the end of ``epochs`` (or of ``max_samples``), at ``global_batch``
    rows a step, ``samples`` rows trained so far; ``plan(at, global_batch)`` is the rest of ``at``'s epoch."""
    steps, budget = 0, None if max_samples is None else max_samples - samples
    for epoch in range(here.epoch, epochs):
        rest = limited(plan(here if epoch == here.epoch else Position(epoch), global_batch), budget)
        steps += rest.num_steps - rest.start_step
        if budget is not None:
            budget -= rest.trained_rows
            if budget <= 0:
                break
    return steps


def checkpoint_position(resumed: dict[str, Any]) -> Position:
    """A checkpoint's data position. Checkpoints written before the position had its row hold
    ``(epoch, step)`` of a plan cut with the global batch of the run that wrote them: the row follows."""
    pos = resumed["position"]
    if "row" in pos:
        return Position(**pos)
    train = resumed["config"]["train"]
    batch = train["batch_per_rank"] * resumed["world_size"] if train.get("batch_per_rank") \
        else train["global_batch_size"]
    return Position(pos["epoch"], pos["step"], pos["step"] * batch)


def fit_schedule(cfg: Config, plan: Callable[[Position, int], EpochPlan], epochs: int, global_batch: int,
                 global_step: int, here: Position, samples: int, schedule: Schedule) -> tuple[int, Schedule]:
    """The steps the run takes in all at ``global_batch`` rows a step, and the LR schedule fitted to them,
    for a (re)start at ``global_step`` with data position ``here``, ``samples`` rows trained and
    ``schedule`` the one fitted so far; ``plan(at, global_batch)`` is the rest of ``at``'s epoch."""
    max_steps, max_samples = cfg.train.max_steps or 2**62, cfg.train.max_samples
    if cfg.data.follow:  # how long training lasts is unknown (the schedules that need it require --max-steps)
        return max_steps, (0, 0.0, max_steps, global_batch)
    if cfg.train.batch_per_rank:
        # The global batch is this world's, and may differ from the one the run began with: count the
        # steps that remain at this size. --max-steps counts optimizer steps, whatever their size. On a
        # world change the LR schedule is refitted to the new total from where it stands (continuous,
        # ending on the last step; refit_schedule); warm-up counts optimizer steps.
        total = min(max_steps, global_step + steps_left(plan, here, epochs, global_batch, samples, max_samples))
        return total, refit_schedule(cfg, global_step, schedule, total, global_batch)
    total = min(max_steps, steps_for_samples(plan(Position(), global_batch), epochs, max_samples))
    return total, (0, 0.0, total, global_batch)
