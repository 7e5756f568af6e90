"""dtrain's training step on in-memory tensors: ``dtrain.train.step.TrainStep``, the step the trainer calls.

    python benchmarks/peers/dtrain_step.py --model small --global-batch 128                  # 1 rank
    horovodrun -np 2 -H localhost:2 --gloo python benchmarks/peers/dtrain_step.py --model small

Per step, as ``Trainer._train_step`` does (mini-batch mode, sum reduction, no compression): the
learning rate set (``TrainStep.set_lr`` with ``lr_factor``), then ``TrainStep`` itself: the dropout
seed for a model that draws random numbers, ``zero_grad``, forward and backward (loss *sum* / global
rows), the counts and the stop vote, the gradient combine (one collective, or on one host the sharded
step inside ``optimizer.step()``), ``optimizer.step()``; then ``counts.take()``. Only the Dask stream
is left out: each rank slices its part of every global batch (``plan.rank_slice``) from the same
in-memory tensors, so this measures the training engine alone. ``dtrain.dist.init()`` applies
dtrain's performance settings (threads, transport, cycle time).
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from _harness import MODELS, measure, parser, report, synthetic

from dtrain import dist
from dtrain.config import Config, ModelConfig, OptimConfig
from dtrain.data.plan import rank_slice
from dtrain.data.stream import Batch
from dtrain.models import mlp
from dtrain.train.schedule import lr_factor
from dtrain.train.step import TrainStep, step_seed


def _no_wait() -> float:
    return 0.0


def make_step(args: argparse.Namespace) -> tuple[Callable[[], None], Callable[[], dict[str, Any]]]:
    """dtrain's training step per call (model, optimizer and data made here; ``dist.init()`` done), and
    what to report about it once measured. Also B1's paired run."""
    rank, world = dist.rank(), dist.size()
    inputs, hidden, outputs = MODELS[args.model]
    cfg = Config(model=ModelConfig(hidden=hidden), optim=OptimConfig(optimizer="sgd", lr=args.lr, momentum=0.9))
    seed, task, device = args.seed, "classification", dist.device()

    torch.manual_seed(seed)
    model = mlp(inputs, outputs, cfg.model.hidden, cfg.model.dropout).to(device)
    train_step = TrainStep(cfg, model, task, device, alone=not dist.is_distributed())
    dist.broadcast_parameters(model, buffers_only=train_step.sharded is not None)

    x, y = synthetic(args.rows, args.model, seed, device)  # on a GPU, rows already there: the step alone is timed
    b = args.global_batch
    lo, hi = rank_slice(b, world, rank)
    row_ids = np.arange(args.rows, dtype=np.int64)
    starts = itertools.cycle(range(0, args.rows - b + 1, b))
    global_step, total_steps, allreduce_s = 0, 2**62, 0.0

    def next_batch() -> Batch:
        i = next(starts)
        return Batch(0, i // b, x[i + lo : i + hi], y[i + lo : i + hi], row_ids[i + lo : i + hi], b)

    def step() -> None:
        nonlocal global_step, allreduce_s
        batch = next_batch()
        train_step.set_lr(cfg.optim.lr * lr_factor(cfg, global_step, total_steps))
        seconds, _ = train_step(batch, step_seed(seed, global_step, rank), True, _no_wait, world, _no_wait)
        allreduce_s += seconds
        global_step += 1
        _loss_sum, _right, _rows, _votes = train_step.counts.take()

    def info() -> dict[str, Any]:
        return {"transport": dist.transport(), "sharded": train_step.sharded is not None,
                "allreduce_ms_per_step": 1e3 * allreduce_s / max(global_step, 1)}

    return step, info


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    dist.init()
    step, info = make_step(args)
    rates = measure(step, args.global_batch, args, agree=dist.broadcast_object, sync=dist.barrier)
    report("dtrain_step", args, rates, dist.size(), dist.rank(), **info())
    dist.shutdown()


if __name__ == "__main__":
    main()
