"""The learning-rate range test (Smith, "Cyclical Learning Rates", 2017; fastai's and Lightning's
``lr_find``): train a short run whose LR rises exponentially from ``--start-lr`` to ``--end-lr``,
record the loss at each step, and suggest a third of the LR where the smoothed loss is lowest (for SGD
with momentum m, times (1 - m) / (1 + m): see ``suggest``).

    python -m dtrain.lr_find [--start-lr 1e-6] [--end-lr 10] [--num-steps 100] [run flags...]

Every flag of ``python -m dtrain`` is taken (data, model, optimizer, cluster), and under
``horovodrun`` the test runs on the ranks and Dask cluster a run would use: it *is* a run
(``dtrain.engine.run``) with ``--schedule exponential`` per step rising instead of decaying, one
metrics line a step, no resume, and ``--stop-diverged 4``: every rank stops at the same step once the
smoothed loss exceeds 4 times its lowest or is not finite (the ranks see the same synced losses, so they
agree without a vote), as fastai's and Lightning's range tests stop. Rank 0 then reads the losses, cuts
them at the same point, prints the suggestion and writes ``lr_find.png`` (loss against LR, log scale, the
suggestion marked) and ``lr_find.json`` into the run directory.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from collections.abc import Sequence
from typing import Any

log = logging.getLogger(__name__)

DIVERGED = 4.0  # smoothed loss this many times its minimum: diverged (fastai's stop_div threshold)


def smooth(losses: Sequence[float], beta: float = 0.9) -> list[float]:
    """Bias-corrected exponential moving average (as fastai's recorder)."""
    out, avg = [], 0.0
    for i, loss in enumerate(losses, start=1):
        avg = beta * avg + (1 - beta) * loss
        out.append(avg / (1 - beta**i))
    return out


def suggest(lrs: Sequence[float], losses: Sequence[float], beta: float = 0.9,
            momentum: float = 0.0) -> tuple[float, int]:
    """``(suggested LR, steps kept before divergence)``: a third of the LR where the smoothed loss is
    lowest, among the steps before it diverges, times ``(1 - momentum) / (1 + momentum)`` for SGD with
    momentum. Raises ValueError with too few steps.

    Why a third: the lowest loss marks the edge of stability, near ``2 / curvature``, where the fastest
    steady rate is ``1 / curvature``; the moving average's lag puts the minimum a little past the edge.
    On a least-squares problem whose best rate is known (tests/unit/test_lr_find.py) this lands within
    a factor of 1.5 of it, where the steepest-slope rule (Lightning's default) suggests ~10 times too low.

    Why the momentum factor: heavy-ball momentum ``m`` moves the edge of stability to ``2 (1 + m) /
    curvature`` but multiplies every step by ``1 / (1 - m)`` once the velocity builds up (SGD with
    momentum behaves as plain SGD at ``lr / (1 - m)``), so the rate that takes plain SGD's best step is
    ``(1 - m) / curvature``: ``(1 - m) / (1 + m)`` of what the edge says without it. With momentum 0.9
    that is 1/19: on the generated data and on digits (docs/regularization.md) a third of the edge was
    3-10 times above the best rate of a grid.
    """
    if not 0 <= momentum < 1:
        raise ValueError(f"momentum {momentum} outside [0, 1)")
    smoothed = smooth(losses, beta)
    kept, best = len(smoothed), math.inf
    for i, s in enumerate(smoothed):
        if not math.isfinite(s) or (i > 0 and s > DIVERGED * best):
            kept = i
            break
        best = min(best, s)
    if kept < 3:
        raise ValueError(f"the loss diverged after {kept} steps; lower --start-lr")
    lowest = min(range(kept), key=smoothed.__getitem__)
    return float(lrs[lowest]) / 3 * (1 - momentum) / (1 + momentum), kept


def plot(lrs: Sequence[float], losses: Sequence[float], suggestion: float, kept: int, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(lrs[:kept], losses[:kept], alpha=0.4, label="loss")
    ax.plot(lrs[:kept], smooth(losses)[:kept], label="smoothed")
    ax.axvline(suggestion, color="red", linestyle="--", label=f"suggested {suggestion:.3g}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _parse(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="python -m dtrain.lr_find", add_help=False)
    parser.add_argument("--start-lr", type=float, default=1e-6)
    parser.add_argument("--end-lr", type=float, default=10.0)
    parser.add_argument("--num-steps", type=int, default=100)
    return parser.parse_known_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    from dtrain import cli
    from dtrain.config import UserError

    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(__doc__)
        return
    logging.basicConfig(level=os.environ.get("DTRAIN_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        opts, rest = _parse(argv)
        if not 0 < opts.start_lr < opts.end_lr:
            raise UserError(f"--start-lr/--end-lr: need 0 < start < end, got {opts.start_lr} and {opts.end_lr}; "
                            "e.g. --start-lr 1e-6 --end-lr 10")
        if opts.num_steps < 5:
            raise UserError(f"--num-steps: needs at least 5 steps, got {opts.num_steps}; e.g. 100")
        cfg = cli.parse_config(rest)
        o, t, r = cfg.optim, cfg.train, cfg.run
        o.schedule, o.decay_per, o.warmup_steps, o.lr = "exponential", "step", 0, opts.start_lr
        # A rate that rises: set after validation, which keeps a user's --lr-decay in (0, 1].
        o.lr_decay = (opts.end_lr / opts.start_lr) ** (1 / (opts.num_steps - 1))
        t.max_steps, t.log_every, t.epochs = opts.num_steps, 1, max(t.epochs, opts.num_steps)
        t.early_stop, t.stop_diverged = None, DIVERGED
        r.resume, r.checkpoint_every, r.checkpoint_seconds = "never", 0, 0.0
        r.run_dir = r.run_dir or os.path.join("runs", "lr-find")
        from dtrain import dist
        from dtrain.engine import run

        run(cfg)
        if not dist.is_main():
            return
        result = analyse(r.run_dir, momentum=o.momentum if o.optimizer == "sgd" else 0.0)
        steps = len(result["losses"])
        if steps < opts.num_steps:
            print(f"the loss diverged at {result['lrs'][-1]:.3g}: stopped after {steps} of {opts.num_steps} steps")
        print(f"suggested learning rate: {result['suggested_lr']:.3g} (plot: {result['plot']})")
    except UserError as e:
        cli._fail(str(e))


def analyse(run_dir: str, momentum: float = 0.0) -> dict[str, Any]:
    """Read a range test's metrics, write lr_find.png and lr_find.json, return the suggestion."""
    from dtrain.config import UserError

    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        steps = [m for m in map(json.loads, f) if "lr" in m and "loss" in m]
    lrs, losses = [m["lr"] for m in steps], [m["loss"] for m in steps]
    try:
        suggestion, kept = suggest(lrs, losses, momentum=momentum)
    except ValueError as e:
        raise UserError(f"--start-lr: {e}") from None
    path = os.path.join(run_dir, "lr_find.png")
    plot(lrs, losses, suggestion, kept, path)
    result = {"suggested_lr": suggestion, "steps_kept": kept, "lrs": lrs, "losses": losses, "plot": path}
    with open(os.path.join(run_dir, "lr_find.json"), "w") as f:
        json.dump(result, f)
    return result


if __name__ == "__main__":
    main()
