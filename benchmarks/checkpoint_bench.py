"""How long the training loop blocks per checkpoint: dtrain's async save vs a synchronous torch.save.

    .venv/bin/python benchmarks/checkpoint_bench.py [--width 2048] [--repeat 5] [--json out.json]

A real training loop (an MLP with AdamW, batch ``--batch``) checkpoints every ``--every`` steps, the
way the trainer does it: ``Checkpointer.save_async`` with the parameters and optimizer moments
deferred, and ``fence()`` before the next ``optimizer.step()``. "blocked" is what the loop waits for a
checkpoint: for dtrain, the in-memory copy of what is not deferred, the wait at the fence and for the
write to finish before the next checkpoint; for the synchronous contender, ``torch.save`` of the same
state with fsync and rename. "time lost" is the honest total: how much longer ``--every`` steps take
with a checkpoint than without, so a writer thread that slows training by sharing its cores counts.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from dtrain.checkpoint import Checkpointer
from dtrain.models import mlp


def sync_save(state: dict, path: str) -> None:
    tmp = path + ".tmp"
    torch.save(state, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=2048, help="MLP width (3 hidden layers)")
    ap.add_argument("--batch", type=int, default=64, help="rows per training step")
    ap.add_argument("--every", type=int, default=20, help="steps between checkpoints")
    ap.add_argument("--repeat", type=int, default=5, help="checkpoints per contender")
    ap.add_argument("--json", help="write results here")
    args = ap.parse_args()
    torch.manual_seed(0)
    model = mlp(args.width, 10, [args.width] * 3)
    opt = torch.optim.AdamW(model.parameters())
    params = list(model.parameters())
    x, y = torch.randn(args.batch, args.width), torch.randint(0, 10, (args.batch,))

    def forward_backward() -> None:
        opt.zero_grad(set_to_none=False)
        F.cross_entropy(model(x), y).backward()

    def trainer_state() -> dict:
        return {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": 0}

    def only_stepped() -> object:
        ptrs = {p.data_ptr() for p in params} | {
            v.data_ptr() for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor)}
        return lambda t: t.numel() > 0 and t.data_ptr() in ptrs

    for _ in range(3):  # warm-up, and AdamW's moments exist
        forward_backward()
        opt.step()
    mbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values()) * 3 / 2**20

    def interval(save: str, i: int) -> tuple[float, float]:
        """``--every`` steps after a checkpoint (``none``, ``sync`` or ``async``), the write finished
        within them or waited for at their end: (the interval's seconds, the loop's blocked seconds)."""
        t0 = time.perf_counter()
        blocked = 0.0
        if save == "sync":
            sync_save(trainer_state(), os.path.join(d, "sync.pt"))
            blocked = time.perf_counter() - t0
        elif save == "async":
            ck.save_async(i, trainer_state(), defer=only_stepped())  # type: ignore[arg-type]
        for _ in range(args.every):
            forward_backward()
            ck.fence()
            opt.step()
        if save == "async":
            t_wait = time.perf_counter()
            ck.wait()  # a write still in flight would block the next checkpoint
            blocked = ck.last_block_seconds + time.perf_counter() - t_wait
            write_async.append(ck.last_write_seconds)
        return time.perf_counter() - t0, blocked

    runs: dict[str, list[tuple[float, float]]] = {"none": [], "sync": [], "async": []}
    write_async: list[float] = []
    with tempfile.TemporaryDirectory() as d:
        ck = Checkpointer(os.path.join(d, "ckpt"), keep=2)
        for i in range(args.repeat):  # alternate the contenders
            for save in runs:
                runs[save].append(interval(save, i))
    base = statistics.median(t for t, _ in runs["none"])
    med = {"interval_s": base, "async_write_s": statistics.median(write_async)}
    for save in ("sync", "async"):
        med[f"{save}_blocked_s"] = statistics.median(b for _, b in runs[save])
        med[f"{save}_loop_cost_s"] = max(0.0, statistics.median(t for t, _ in runs[save]) - base)
    med["ratio_async_to_sync"] = med["async_blocked_s"] / med["sync_blocked_s"]
    med["cost_ratio_async_to_sync"] = med["async_loop_cost_s"] / max(med["sync_loop_cost_s"], 1e-9)
    print(f"checkpoint of ~{mbytes:.0f} MB (model + AdamW state) every {args.every} steps "
          f"({1e3 * base / args.every:.0f} ms/step), median of {args.repeat}")
    print(f"{'contender':<28}{'loop blocked (ms)':>20}{'loop time lost (ms)':>22}")
    for name, key in (("torch.save (sync, fsync)", "sync"), ("dtrain async", "async")):
        print(f"{name:<28}{1e3 * med[f'{key}_blocked_s']:>20.1f}{1e3 * med[f'{key}_loop_cost_s']:>22.1f}")
    print(f"async blocking / sync save = {med['ratio_async_to_sync']:.3f}  (target <= 0.10); time lost "
          f"{med['cost_ratio_async_to_sync']:.2f} of sync (the writer thread shares the cores with training)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"megabytes": mbytes, **med, "repeat": args.repeat, "every": args.every}, f, indent=1)


if __name__ == "__main__":
    main()
