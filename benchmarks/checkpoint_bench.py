"""How long the training loop blocks per checkpoint: dtrain's async save vs a synchronous torch.save.

    .venv/bin/python benchmarks/checkpoint_bench.py [--width 2048] [--repeat 5] [--json out.json]

The state is a real trainer state: an MLP and its AdamW moments. "blocked" is the time the loop
waits (dtrain: the in-memory snapshot, plus waiting for a previous write still in flight; sync: the
whole save incl. fsync and rename).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch

from dtrain.checkpoint import Checkpointer
from dtrain.models import mlp


def trainer_state(width: int) -> dict:
    model = mlp(width, 10, [width, width, width])
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(8, width)).sum().backward()
    opt.step()
    return {"model": model.state_dict(), "optimizer": opt.state_dict()}


def sync_save(state: dict, path: str) -> None:
    tmp = path + ".tmp"
    torch.save(state, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=2048, help="MLP width (3 hidden layers)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--train-seconds", type=float, default=1.0, help="simulated training between saves")
    ap.add_argument("--json", help="write results here")
    args = ap.parse_args()
    state = trainer_state(args.width)
    mbytes = sum(t.numel() * t.element_size() for t in state["model"].values()) * 3 / 2**20
    blocked_async, blocked_sync, write_async = [], [], []
    with tempfile.TemporaryDirectory() as d:
        ck = Checkpointer(os.path.join(d, "ckpt"), keep=2)
        for i in range(args.repeat):  # alternate the contenders
            t0 = time.perf_counter()
            sync_save(state, os.path.join(d, "sync.pt"))
            blocked_sync.append(time.perf_counter() - t0)
            ck.save_async(i, state)
            blocked_async.append(ck.last_block_seconds)
            time.sleep(args.train_seconds)  # the loop trains while the write proceeds
            ck.wait()
            write_async.append(ck.last_write_seconds)
    med = {k: statistics.median(v) for k, v in
           {"sync_blocked_s": blocked_sync, "async_blocked_s": blocked_async, "async_write_s": write_async}.items()}
    med["ratio_async_to_sync"] = med["async_blocked_s"] / med["sync_blocked_s"]
    print(f"checkpoint of ~{mbytes:.0f} MB (model + AdamW state), median of {args.repeat}")
    print(f"{'contender':<28}{'loop blocked (ms)':>20}")
    print(f"{'torch.save (sync, fsync)':<28}{1e3 * med['sync_blocked_s']:>20.1f}")
    print(f"{'dtrain async':<28}{1e3 * med['async_blocked_s']:>20.1f}")
    print(f"async blocking / sync save = {med['ratio_async_to_sync']:.3f}  (target <= 0.10)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"megabytes": mbytes, **med, "repeat": args.repeat}, f, indent=1)


if __name__ == "__main__":
    main()
