"""Plain Horovod, the pattern of its documentation and examples/pytorch/pytorch_mnist.py; under horovodrun.

    horovodrun -np 2 -H localhost:2 --gloo python benchmarks/peers/horovod_plain.py --model small --global-batch 128

``DistributedSampler`` + ``DataLoader`` over an in-memory ``TensorDataset``, ``hvd.DistributedOptimizer``
(one allreduce per parameter, launched from backward hooks, fused by Horovod's background thread),
learning rate scaled by the world size, parameters and optimizer state broadcast from rank 0.

Nothing is tuned: threads and ``HOROVOD_CYCLE_TIME`` are whatever the environment says (torch's
default threads, Horovod's 1 ms cycle). ``dtrain.bench`` also runs it with ``OMP_NUM_THREADS=1
HOROVOD_CYCLE_TIME=0.1`` (the tuned variant), and with ``--threads-1``, the example's own
``torch.set_num_threads(1)``.
"""

from __future__ import annotations

from collections.abc import Iterator

import horovod.torch as hvd
import torch
import torch.nn.functional as F
from _harness import build_model, measure, parser, report, synthetic
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler


def main() -> None:
    ap = parser(__doc__.splitlines()[0])
    ap.add_argument("--threads-1", action="store_true", help="torch.set_num_threads(1), as pytorch_mnist.py does")
    args = ap.parse_args()
    hvd.init()
    torch.manual_seed(args.seed)
    if args.threads_1:
        torch.set_num_threads(1)  # Horovod's example: limit # of CPU threads to be used per worker.

    x, y = synthetic(args.rows, args.model, args.seed)
    dataset = TensorDataset(x, y)
    sampler = DistributedSampler(dataset, num_replicas=hvd.size(), rank=hvd.rank())
    loader = DataLoader(dataset, batch_size=args.global_batch // hvd.size(), sampler=sampler)

    model = build_model(args.model)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr * hvd.size(), momentum=0.9)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(optimizer, root_rank=0)
    optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters(), op=hvd.Average)

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch = 0
        while True:
            sampler.set_epoch(epoch)
            yield from loader
            epoch += 1

    data = batches()

    def step() -> None:
        xb, yb = next(data)
        optimizer.zero_grad()
        loss = F.cross_entropy(model(xb), yb)
        loss.backward()
        optimizer.step()

    rates = measure(step, args.global_batch, args, agree=lambda n: hvd.broadcast_object(n, root_rank=0),
                    sync=hvd.barrier)
    report("horovod_plain", args, rates, hvd.size(), hvd.rank(), threads_1=args.threads_1)
    hvd.shutdown()


if __name__ == "__main__":
    main()
