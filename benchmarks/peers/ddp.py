"""PyTorch DDP over Gloo, as its tutorial writes it; launched by torchrun.

    python -m torch.distributed.run --nproc-per-node 2 benchmarks/peers/ddp.py --model small --global-batch 128

Each rank trains on its contiguous half of every global batch, sliced from the same in-memory tensors
(what ``DistributedSampler(shuffle=False)`` would give, without a loader's per-row cost). DDP averages
the gradients in buckets (25 MB by default) during the backward pass. Threads: torchrun's default,
``OMP_NUM_THREADS=1`` per rank when it starts more than one (it says so on stderr).
"""

from __future__ import annotations

import itertools
import os

import torch
import torch.distributed as tdist
import torch.nn.functional as F
from _harness import build_model, measure, parser, report, synthetic
from torch.nn.parallel import DistributedDataParallel


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    tdist.init_process_group("gloo")
    rank, world = tdist.get_rank(), tdist.get_world_size()
    torch.manual_seed(args.seed)
    model = DistributedDataParallel(build_model(args.model))
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    x, y = synthetic(args.rows, args.model, args.seed)
    b = args.global_batch
    lo, hi = rank * b // world, (rank + 1) * b // world
    starts = itertools.cycle(range(0, args.rows - b + 1, b))

    def step() -> None:
        i = next(starts)
        opt.zero_grad()
        loss = F.cross_entropy(model(x[i + lo : i + hi]), y[i + lo : i + hi])
        loss.backward()
        opt.step()

    def agree(n: int) -> int:
        box = [n]
        tdist.broadcast_object_list(box, src=0)
        return int(box[0])

    rates = measure(step, b, args, agree=agree, sync=tdist.barrier)
    report("ddp", args, rates, world, rank, omp_from_torchrun=os.environ.get("OMP_NUM_THREADS"))
    tdist.destroy_process_group()


if __name__ == "__main__":
    main()
