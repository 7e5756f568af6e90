"""What every contender of ``python -m dtrain.bench`` shares: model, data, timing and the result line.

Kept apart from the training code of each contender, so that each script shows its training loop as
its users would write it. Contenders are run as scripts (``python benchmarks/peers/x.py``, also under
``torchrun`` or ``horovodrun``), so this module is imported from the script's own directory.

The result is one line on stdout, ``BENCH_RESULT {json}``, written by rank 0 only.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

# name -> (inputs, hidden widths, outputs). "small" is latency-bound (per-step overheads dominate),
# "large" compute-bound (matrix multiplies dominate).
MODELS: dict[str, tuple[int, list[int], int]] = {
    "small": (100, [256, 256], 10),
    "large": (100, [2048, 2048], 10),
    # A GPU kept busy (benchmarks/gpu_check.py, B1 on a GPU): 151 M parameters, seconds a step on a CPU.
    "xlarge": (100, [8192, 8192, 8192], 10),
}

RESULT_PREFIX = "BENCH_RESULT "
# DTRAIN_BENCH_NIC=dt0: count the bytes this host sends on that interface during the timed windows
# (benchmarks/multihost_bench.py). Read from /proc/net/dev, which shows the reading process's network
# namespace (a test bed host's), unlike /sys/class/net.
NIC_ENV = "DTRAIN_BENCH_NIC"
_wire: dict[str, Any] = {}


def parser(description: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--model", choices=sorted(MODELS), default="small")
    ap.add_argument("--global-batch", type=int, default=128, help="rows per optimizer step across all ranks")
    ap.add_argument("--rows", type=int, default=16384, help="rows of the in-memory synthetic dataset")
    ap.add_argument("--warmup", type=int, default=10, help="untimed steps before the first window")
    ap.add_argument("--window-seconds", type=float, default=1.0, help="aimed length of a timed window")
    ap.add_argument("--max-steps", type=int, default=2000, help="at most this many steps per window")
    ap.add_argument("--windows", type=int, default=5, help="timed windows (one samples/s figure each)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=0.01)
    return ap


def build_model(name: str) -> nn.Module:
    """A plain MLP (the same layers as ``dtrain.models.mlp``)."""
    inputs, hidden, outputs = MODELS[name]
    layers: list[nn.Module] = []
    width = inputs
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, outputs))
    return nn.Sequential(*layers)


def synthetic(rows: int, model: str, seed: int = 0,
              device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic in-memory classification data for ``model``'s input and output sizes, on ``device``
    (the same rows whatever the device: drawn on the CPU)."""
    inputs, _, outputs = MODELS[model]
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(rows, inputs, generator=g), torch.randint(0, outputs, (rows,), generator=g)
    return (x, y) if device is None else (x.to(device), y.to(device))


def default_device() -> torch.device:
    """Where a bare loop trains: the GPU dtrain would use on one rank (``cuda:0``), else the CPU."""
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def _settle() -> None:
    """Wait for the GPU's queued work, so that a window times the steps and not their queueing. A no-op
    unless CUDA was used in this process."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def measure(step: Callable[[], Any], samples_per_step: int, args: argparse.Namespace,
            agree: Callable[[int], int] = lambda n: n, sync: Callable[[], Any] | None = None) -> list[float]:
    """Samples/s of ``args.windows`` consecutive timed windows of calls of ``step``, after a warm-up.

    The steps per window are sized from the warm-up to last about ``args.window_seconds``; every rank
    must run the same number of steps (a collective inside ``step`` keeps them in lock step), so rank
    0's number is used everywhere (``agree``, a broadcast). ``sync`` (a barrier) lines the ranks up
    before the first window.
    """
    steps = agree(_steps_per_window([step], args))
    if sync is not None:
        sync()
    nic = os.environ.get(NIC_ENV)
    sent = tx_bytes(nic) if nic else 0
    rates = [_window(step, steps, samples_per_step) for _ in range(args.windows)]
    if nic:
        _wire.update(nic=nic, tx_bytes_per_step=(tx_bytes(nic) - sent) / (steps * args.windows))
    return rates


def tx_bytes(nic: str) -> int:
    """Bytes sent so far on ``nic`` of this process's network namespace."""
    with open("/proc/net/dev") as f:
        for line in f:
            name, _, counters = line.partition(":")
            if name.strip() == nic:
                return int(counters.split()[8])  # receive has 8 fields, then transmit's bytes
    raise ValueError(f"no interface {nic!r} in /proc/net/dev")


def _steps_per_window(steps: list[Callable[[], Any]], args: argparse.Namespace) -> int:
    """Steps that make a window of about ``args.window_seconds`` for the slowest of ``steps``, each
    warmed up first (``args.warmup`` untimed steps), then timed over a 3-step probe."""
    per_step = []
    for step in steps:
        for _ in range(args.warmup):
            step()
        _settle()
        t0 = time.perf_counter()
        for _ in range(3):
            step()
        _settle()
        per_step.append(max((time.perf_counter() - t0) / 3, 1e-6))
    return int(min(args.max_steps, max(2, args.window_seconds / max(per_step))))


def _window(step: Callable[[], Any], steps: int, samples_per_step: int) -> float:
    """Samples/s of ``steps`` consecutive calls of ``step`` (on a GPU, until their work is done)."""
    _settle()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _settle()
    return steps * samples_per_step / (time.perf_counter() - t0)


def measure_paired(first: Callable[[], Any], second: Callable[[], Any], samples_per_step: int,
                   args: argparse.Namespace) -> tuple[list[float], list[float]]:
    """Samples/s of two steps in one process, timed in alternating windows of the same number of steps
    (the order swapped every window, over an even number of pairs: ``args.windows`` rounded up, so
    that each step goes first as often as the other).

    On a machine whose speed swings from one process to the next (as this 2-core VM's does, up to 2x),
    two processes' medians compare the swings as much as the steps; windows paired in one process see
    the same machine, so their ratio is the steps' own.
    """
    steps = _steps_per_window([first, second], args)
    rates: tuple[list[float], list[float]] = ([], [])
    for w in range(args.windows + args.windows % 2):
        for i in ((0, 1) if w % 2 == 0 else (1, 0)):
            rates[i].append(_window((first, second)[i], steps, samples_per_step))
    return rates


def report(contender: str, args: argparse.Namespace, rates: list[float], world: int, rank: int,
           **extra: Any) -> None:
    if rank != 0:
        return
    result = {"contender": contender, "model": args.model, "global_batch": args.global_batch, "world_size": world,
              "samples_per_sec": rates, "torch_threads": torch.get_num_threads(),
              "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "HOROVOD_CYCLE_TIME", "HOROVOD_FUSION_THRESHOLD")
                      if k in os.environ}, **_wire, **extra}
    print(RESULT_PREFIX + json.dumps(result), flush=True)
