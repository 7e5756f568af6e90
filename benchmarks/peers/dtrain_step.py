"""dtrain's training step on in-memory tensors: the per-step code path of ``dtrain.engine.run``.

    python benchmarks/peers/dtrain_step.py --model small --global-batch 128                  # 1 rank
    horovodrun -np 2 -H localhost:2 --gloo python benchmarks/peers/dtrain_step.py --model small

The loop body is the one of ``engine.run`` (mini-batch mode, sum reduction, no compression): the
learning rate set per step, the per-step dropout seed (``engine.seed_step``, for a model that draws
random numbers: ``models.draws_random``), ``optimizer.zero_grad(set_to_none=alone)``,
``engine.forward_backward`` (loss *sum* / global rows), the loss and counts added into ``counts``
(``engine.StepCounts``), the stop vote, ``dist.allreduce_sum_(grads, uncompressed=[counts.tensor])``
(one collective), ``optimizer.step()``, ``counts.take()``; on one host, the sharded step instead
(``engine.shard_optimizer``: the collective inside ``optimizer.step()``). Only the Dask stream is left out: each
rank slices its part of every global batch (``plan.rank_slice``) from the same in-memory tensors, so
this measures the training engine alone. ``dtrain.dist.init()`` applies dtrain's performance
settings (threads, transport, cycle time).
"""

from __future__ import annotations

import argparse
import itertools
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from _harness import MODELS, measure, parser, report, synthetic

from dtrain import dist
from dtrain.config import Config, ModelConfig, OptimConfig
from dtrain.engine import (
    forward_backward,
    gradient_buffers,
    lr_factor,
    make_optimizer,
    seed_step,
    shard_optimizer,
    step_seed,
)
from dtrain.models import draws_random, mlp
from dtrain.plan import rank_slice
from dtrain.stream import Batch


def make_step(args: argparse.Namespace) -> tuple[Callable[[], None], Callable[[], dict[str, Any]]]:
    """dtrain's training step per call (model, optimizer and data made here; ``dist.init()`` done), and
    what to report about it once measured. Also B1's paired run."""
    rank, world = dist.rank(), dist.size()
    inputs, hidden, outputs = MODELS[args.model]
    cfg = Config(model=ModelConfig(hidden=hidden), optim=OptimConfig(optimizer="sgd", lr=args.lr, momentum=0.9))
    seed, task, device = args.seed, "classification", dist.device()

    torch.manual_seed(seed)
    model = mlp(inputs, outputs, cfg.model.hidden, cfg.model.dropout).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    alone = not dist.is_distributed()
    grads, counts = gradient_buffers(params, device, alone)
    sharded = shard_optimizer(cfg, model, grads)
    optimizer = sharded or make_optimizer(cfg, model.parameters())
    dist.broadcast_parameters(model, buffers_only=sharded is not None)
    random_forward = draws_random(model)

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
        for g in optimizer.param_groups:
            g["lr"] = cfg.optim.lr * lr_factor(cfg, global_step, total_steps)
        if random_forward:
            seed_step(step_seed(seed, global_step, rank), device)
        optimizer.zero_grad(set_to_none=alone)
        loss, right = forward_backward(model, batch, task, cfg.train.accumulate, batch.global_rows)
        counts.add(loss, right, batch.rows)
        counts.vote(0.0)  # the stop vote
        t0 = time.perf_counter()
        if sharded is None:
            dist.allreduce_sum_(grads, compression=cfg.optim.compression, uncompressed=[counts.tensor])
            allreduce_s += time.perf_counter() - t0
        optimizer.step()  # sharded: the gradients' sum too
        if sharded is not None:
            allreduce_s += time.perf_counter() - t0
        global_step += 1
        _loss_sum, _right, _rows, _votes = counts.take()

    def info() -> dict[str, Any]:
        return {"transport": dist.transport(), "sharded": sharded is not None,
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
