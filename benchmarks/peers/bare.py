"""Bare PyTorch: one process, torch's default threads (all usable cores), the whole batch in one step.
On a machine with a GPU, model and data on ``cuda:0``.

    python benchmarks/peers/bare.py --model small --global-batch 128

The baseline of B1 (dtrain's overhead on one rank) and of B3 (the ceiling: what 2 ranks on this host
could at best reach). Batches are views sliced from in-memory tensors: no loader cost at all.
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from _harness import build_model, default_device, measure, parser, report, synthetic


def make_step(args: argparse.Namespace) -> Callable[[], None]:
    """One bare training step per call (model, optimizer and data made here): also B1's paired run."""
    device = default_device()
    torch.manual_seed(args.seed)
    model = build_model(args.model).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    x, y = synthetic(args.rows, args.model, args.seed, device)
    b = args.global_batch
    starts = itertools.cycle(range(0, args.rows - b + 1, b))

    def step() -> None:
        i = next(starts)
        opt.zero_grad()
        loss = F.cross_entropy(model(x[i : i + b]), y[i : i + b])
        loss.backward()
        opt.step()

    return step


def main() -> None:
    ap = parser(__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rates = measure(make_step(args), args.global_batch, args)
    report("bare", args, rates, world=1, rank=0)


if __name__ == "__main__":
    main()
