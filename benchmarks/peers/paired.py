"""B1's overhead paired in one process: dtrain's step and the bare loop, timed in alternating windows.

    python benchmarks/peers/paired.py --model small --global-batch 128

The steps are those of ``dtrain_step.py`` and of ``bare.py``, each with its own model, optimizer and
tensors. Both run with the threads ``dtrain.dist.init()`` chose (on one rank, the usable CPUs), so the
pairs compare the steps' code; ``bare.py`` run alone keeps torch's default, which is the physical cores
and can differ on SMT hosts: both counts are reported (``torch_threads_default``, ``torch_threads``).
Reports dtrain's windows as ``samples_per_sec``, the bare loop's as ``bare_samples_per_sec``, and each
pair's ratio (dtrain / bare) as ``paired_ratios``.
"""

from __future__ import annotations

import bare
import dtrain_step
import torch
from _harness import measure_paired, parser, report

from dtrain import dist


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    default_threads = torch.get_num_threads()
    dist.init()
    if dist.size() != 1:
        raise SystemExit("paired.py runs in one process (B1): launch it without horovodrun")
    step, info = dtrain_step.make_step(args)
    ours, theirs = measure_paired(step, bare.make_step(args), args.global_batch, args)
    report("paired", args, ours, 1, 0, bare_samples_per_sec=theirs,
           paired_ratios=[a / b for a, b in zip(ours, theirs, strict=True)], torch_threads_default=default_threads,
           **info())
    dist.shutdown()


if __name__ == "__main__":
    main()
