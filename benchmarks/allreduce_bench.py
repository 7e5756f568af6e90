"""Allreduce latency and bandwidth between ranks (on this host, or on several), for the paper model of scaling.

    horovodrun -np 2 -H localhost:2 --gloo .venv/bin/python benchmarks/allreduce_bench.py [--json out.json]

Times an in-place sum of one float32 buffer of each size (1 element up to the gradients of the
100-2048-2048-10 MLP) through:

* ``horovod``: Horovod's ``allreduce_`` with the settings dtrain gives Horovod when Horovod carries
  the gradients (``DTRAIN_ALLREDUCE=horovod``: threads per rank, ``HOROVOD_CYCLE_TIME`` 0.1 ms unless
  set); it includes Horovod's negotiation between ranks and its background thread's cycle;
* ``torch``: ``torch.distributed.all_reduce`` on a Gloo process group (what DDP calls, and dtrain's
  transport on one host where shared memory cannot serve), no negotiation;
* ``shm``: ``dtrain.shm`` (dtrain's transport on one host): buffers allocated in shared memory,
  summed shard by shard with no socket;
* ``grouped``: Horovod's ``grouped_allreduce_`` on the gradient *list* of each model (one tensor
  per parameter, fused by Horovod into its fusion buffer), dtrain's path before it packed one buffer.

Derives the ring model's ``latency`` and ``bandwidth`` (``t = 2 (n-1) latency + 2 (n-1)/n bytes /
bandwidth``) from the flat-buffer medians (``ring_fit``). Rank 0 prints a table and writes the JSON.

    .venv/bin/python benchmarks/allreduce_bench.py --project bench-results/allreduce.json
    .venv/bin/python benchmarks/allreduce_bench.py --project one-host.json --network two-hosts.json

(no horovodrun) is the paper model of docs/performance.md: it times one rank's step on one thread at
two batch sizes for each model (``t_step(b) = t0 + c b``: fixed cost ``t0``, optimizer included, and
compute per row ``c``), reads the measured latency and bandwidth of ``--path`` (default ``torch``:
Gloo over loopback stands in for a network; ``shm`` is what one host does) and projects samples/s for
1 to 64 ranks, one core each, with no overlap of compute and communication (dtrain's step):
``T(n) = t0 + c ceil(B/n) + t_allreduce(n)``, for a fixed global batch (``B`` = 128, dtrain's default
mode) and for 64 rows per rank (``B`` = 64 n). With ``--network`` (this bench run with one rank on each
of two hosts, e.g. the test bed's), it also projects hosts of 8 ranks summing flat (one ring over every
rank) against hierarchically (``dtrain/hier.py``; ``across_hosts`` says how each is modelled).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as tdist

from dtrain import dist, groups, shm

# Gradient sizes (parameters) of the benchmark MLPs: 100->256->256->10 and 100->2048->2048->10.
MODEL_SHAPES = {
    "small": [(256, 100), (256,), (256, 256), (256,), (10, 256), (10,)],
    "large": [(2048, 100), (2048,), (2048, 2048), (2048,), (10, 2048), (10,)],
}


def model_numel(name: str) -> int:
    return sum(int(torch.Size(s).numel()) for s in MODEL_SHAPES[name])


def timed(fns: dict[str, Callable[[], object]], min_reps: int, min_seconds: float) -> dict[str, list[float]]:
    """Seconds per call of each of ``fns``, the calls alternated (a, b, a, b, ...) so that load from
    other processes falls on all alike. Every rank makes the same calls (rank 0's count is broadcast)."""
    for fn in fns.values():
        for _ in range(3):
            fn()
    t0 = time.perf_counter()
    for fn in fns.values():
        fn()
    once = max(time.perf_counter() - t0, 1e-6)
    reps = dist.broadcast_object(max(min_reps, int(min_seconds / once)), name="reps")
    out: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            out[k].append(time.perf_counter() - t0)
    return out


def ring_fit(rows: list[dict[str, Any]], key: str, world: int) -> dict[str, float]:
    """Latency and bandwidth of the ring model ``t = 2(n-1) latency + 2(n-1)/n bytes / bandwidth``.

    The latency comes from the one-element allreduce (all latency), the bandwidth from the largest
    buffer once that latency is taken off. Two points rather than a least-squares line: under load a
    single slow size would otherwise swing both numbers (and even make the intercept negative).
    """
    small, large = rows[0], rows[-1]
    hops = 2 * (world - 1)
    latency = small[key] / hops
    transfer = max(large[key] - hops * latency, 1e-9)
    return {"latency_s": latency, "bandwidth_Bps": (world - 1) / world * 2 * large["bytes"] / transfer}


def step_seconds(model: str, rows: int, seconds: float = 1.0) -> float:
    """Median seconds of one training step of ``model`` on ``rows`` rows (SGD with momentum), this thread."""
    import torch.nn.functional as F
    from torch import nn

    shapes = MODEL_SHAPES[model]
    widths = [shapes[0][1]] + [s[0] for s in shapes[::2]]
    layers: list[nn.Module] = []
    for i in range(len(widths) - 1):
        layers += [nn.Linear(widths[i], widths[i + 1]), nn.ReLU()]
    net = nn.Sequential(*layers[:-1])
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(rows, widths[0]), torch.randint(0, widths[-1], (rows,))

    def step() -> None:
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()

    for _ in range(3):
        step()
    times: list[float] = []
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end or len(times) < 5:
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def project(fit: dict[str, float], compute: dict[str, tuple[float, float]],
            ranks: tuple[int, ...] = (1, 2, 8, 16, 32, 64)) -> list[dict[str, Any]]:
    """Projected samples/s per model and rank count (see the module docstring): pure arithmetic."""
    out = []
    for model, (t0, c) in compute.items():
        nbytes = 4 * model_numel(model)
        for n in ranks:
            t_ar = 2 * (n - 1) * fit["latency_s"] + 2 * (n - 1) / n * nbytes / fit["bandwidth_Bps"]
            fixed_b = 128
            t_fixed = t0 + c * -(-fixed_b // n) + t_ar
            t_weak = t0 + c * 64 + t_ar
            out.append({"model": model, "ranks": n, "allreduce_ms": 1e3 * t_ar,
                        "fixed128_samples_per_sec": fixed_b / t_fixed, "fixed128_comm_share": t_ar / t_fixed,
                        "weak64_samples_per_sec": 64 * n / t_weak, "weak64_efficiency": (t0 + c * 64) / t_weak})
    return out


def ring(fit: dict[str, float], n: int, nbytes: float) -> float:
    """Seconds of a ring allreduce of ``nbytes`` over ``n`` ranks on a link of ``fit``."""
    return 2 * (n - 1) * fit["latency_s"] + 2 * (n - 1) / n * nbytes / fit["bandwidth_Bps"] if n > 1 else 0.0


def across_hosts(net: dict[str, float], loopback: dict[str, float], shm_fit: dict[str, float], nbytes: float,
                 hosts: int, per_host: int) -> tuple[float, float]:
    """Seconds of the gradient sum over ``hosts`` x ``per_host`` ranks: flat, then hierarchical.

    Flat: one ring over every rank, ordered by host, so each host's link carries one ring edge each
    way; every ring step waits for its slowest edge, a network one or a loopback one. Hierarchical
    (dtrain/hier.py): shared memory within the host, then ``per_host`` rings over the hosts, one per
    local rank, each on ``1/per_host`` of the bytes and all sharing the host's link.
    """
    n = hosts * per_host
    if hosts == 1:
        return ring(loopback, n, nbytes), ring(shm_fit, per_host, nbytes)
    step = max(net["latency_s"] + nbytes / n / net["bandwidth_Bps"],
               loopback["latency_s"] + nbytes / n / loopback["bandwidth_Bps"])
    return 2 * (n - 1) * step, ring(shm_fit, per_host, nbytes) + ring(net, hosts, nbytes)


def print_hosts(net: dict[str, float], one_host: dict[str, dict[str, float]],
                compute: dict[str, tuple[float, float]], per_host: int = 8) -> None:
    print(f"\nacross hosts, {per_host} ranks each (network: {1e6 * net['latency_s']:.0f} us per hop, "
          f"{net['bandwidth_Bps'] / 1e9:.2f} GB/s; within a host: loopback and shared memory as measured)")
    print(f"{'model':<6} {'hosts':>5} {'flat ms':>9} {'hier ms':>9} {'B=128 flat':>11} {'B=128 hier':>11} "
          f"{'64/rank flat':>13} {'64/rank hier':>13}")
    for model, (t0, c) in compute.items():
        nbytes = 4 * model_numel(model)
        for hosts in (1, 2, 8, 64):
            n = hosts * per_host
            flat, hier = across_hosts(net, one_host["torch"], one_host["shm"], nbytes, hosts, per_host)
            fixed = [128 / (t0 + c * -(-128 // n) + t) for t in (flat, hier)]
            weak = [64 * n / (t0 + c * 64 + t) for t in (flat, hier)]
            print(f"{model:<6} {hosts:>5} {1e3 * flat:>9.2f} {1e3 * hier:>9.2f} {fixed[0]:>11,.0f} {fixed[1]:>11,.0f} "
                  f"{weak[0]:>13,.0f} {weak[1]:>13,.0f}")


def main_project(path: str | None, transport: str, latency_us: float | None, gbps: float | None,
                 network: str | None = None) -> None:
    torch.set_num_threads(1)
    fit: dict[str, float] = {}
    if path:
        with open(path) as f:
            fit = json.load(f)["fit"][transport]
    if latency_us is not None:  # another network's numbers, e.g. between hosts
        fit["latency_s"] = latency_us * 1e-6
    if gbps is not None:
        fit["bandwidth_Bps"] = gbps * 1e9 / 8
    if set(fit) != {"latency_s", "bandwidth_Bps"}:
        raise SystemExit("--project: give this bench's JSON, or both --latency-us and --gbps")
    path = path if latency_us is None and gbps is None else "the command line"
    compute = {}
    for model in MODEL_SHAPES:
        small, large = step_seconds(model, 8), step_seconds(model, 64)
        c = max((large - small) / 56, 0.0)
        compute[model] = (max(small - 8 * c, 0.0), c)
        print(f"{model}: one thread, step = {1e3 * compute[model][0]:.2f} ms + {1e6 * c:.1f} us per row")
    print(f"{transport} allreduce: latency {1e6 * fit['latency_s']:.0f} us per hop, "
          f"bandwidth {fit['bandwidth_Bps'] / 1e9:.2f} GB/s (from {path})")
    print(f"{'model':<6} {'ranks':>5} {'allreduce ms':>12} {'B=128 samples/s':>16} {'comm share':>10} "
          f"{'64/rank samples/s':>18} {'efficiency':>10}")
    for r in project(fit, compute):
        print(f"{r['model']:<6} {r['ranks']:>5} {r['allreduce_ms']:>12.2f} {r['fixed128_samples_per_sec']:>16,.0f} "
              f"{r['fixed128_comm_share']:>10.0%} {r['weak64_samples_per_sec']:>18,.0f} "
              f"{r['weak64_efficiency']:>10.0%}")
    if network:  # this bench's JSON from ranks on several hosts: their Gloo fit is the network's
        if not path:
            raise SystemExit("--network: also give a one-host JSON of this bench (loopback and shared memory)")
        with open(network) as f:
            net = json.load(f)["fit"]["torch"]
        with open(path) as f:
            one_host = json.load(f)["fit"]
        print_hosts(net, one_host, compute)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--min-reps", type=int, default=20)
    ap.add_argument("--min-seconds", type=float, default=0.5, help="time per size and path")
    ap.add_argument("--json", help="write the results here (rank 0)")
    ap.add_argument("--project", nargs="?", const="", metavar="JSON",
                    help="no collectives: project scaling from this bench's JSON (or --latency-us and --gbps)")
    ap.add_argument("--latency-us", type=float, help="--project: per-hop latency of another network (us)")
    ap.add_argument("--gbps", type=float, help="--project: link bandwidth of another network (Gbit/s)")
    ap.add_argument("--path", choices=("torch", "horovod", "shm"), default="torch",
                    help="--project: which transport")
    ap.add_argument("--network", metavar="JSON", help="--project: this bench's JSON from ranks on two hosts: "
                    "also project flat against hierarchical sums on 1-64 hosts of 8 ranks")
    args = ap.parse_args()
    if args.project is not None:
        main_project(args.project or None, args.path, args.latency_us, args.gbps, args.network)
        return
    os.environ.setdefault("DTRAIN_ALLREDUCE", "horovod")  # dtrain's Horovod settings; the groups below are ours
    dist.init()
    hvd = dist._hvd
    rank, world = dist.rank(), dist.size()
    if world < 2:
        raise SystemExit("run me under horovodrun -np 2 (or more)")
    # torch.distributed Gloo beside Horovod (on rank 0's address across hosts), and dtrain's shared
    # memory where every rank is on this host.
    groups.gloo_group(dist.GROUP_TIMEOUT)
    group = groups.host_shm_group(dist.GROUP_TIMEOUT) if not dist.spans_hosts() and shm.supported() else None
    paths = ("horovod", "torch", "shm") if group is not None else ("horovod", "torch")
    sizes = sorted({1, 256, 4096, 65536, 262144, 1 << 20, model_numel("small"), model_numel("large"), 1 << 23})
    rows = []
    for n in sizes:
        a, b = torch.ones(n), torch.ones(n)
        fns: dict[str, Callable[[], object]] = {
            "horovod": lambda a=a: hvd.allreduce_(a, op=hvd.Sum, name=f"flat{a.numel()}"),
            "torch": lambda b=b: tdist.all_reduce(b)}
        if group is not None:
            c = group.alloc(n)
            fns["shm"] = lambda c=c: group.allreduce_(c, f"flat{c.numel()}")
        t = timed(fns, args.min_reps, args.min_seconds)
        rows.append({"numel": n, "bytes": 4 * n, **{f"{k}_s": statistics.median(v) for k, v in t.items()}})
    grouped = {}
    for name, shapes in MODEL_SHAPES.items():
        tensors = [torch.ones(s) for s in shapes]
        flat = torch.ones(model_numel(name))
        t = timed({"grouped": lambda ts=tensors: hvd.grouped_allreduce_(ts, op=hvd.Sum, name="grouped"),
                   "flat": lambda f=flat: hvd.allreduce_(f, op=hvd.Sum, name="flat-model")},
                  args.min_reps, args.min_seconds)
        grouped[name] = {"tensors": len(tensors), "bytes": 4 * model_numel(name),
                         "horovod_grouped_s": statistics.median(t["grouped"]),
                         "horovod_flat_s": statistics.median(t["flat"])}
    fits = {path: ring_fit(rows, f"{path}_s", world) for path in paths}
    if group is not None:
        group.close()
    tdist.destroy_process_group()
    if rank == 0:
        where = f"across {os.environ.get('HOROVOD_CROSS_SIZE')} hosts" if dist.spans_hosts() else "on one host"
        print(f"allreduce (sum, float32), {world} ranks {where}, median seconds per call; "
              f"HOROVOD_CYCLE_TIME={os.environ.get('HOROVOD_CYCLE_TIME')}, torch threads {torch.get_num_threads()}")
        print(f"{'bytes':>12}" + "".join(f"{p + ' ms':>14}" for p in paths))
        for r in rows:
            print(f"{r['bytes']:>12}" + "".join(f"{1e3 * r[p + '_s']:>14.3f}" for p in paths))
        for name, g in grouped.items():
            print(f"{name} model gradients ({g['bytes']} B) through Horovod: {g['tensors']} tensors grouped "
                  f"{1e3 * g['horovod_grouped_s']:.3f} ms, one flat tensor {1e3 * g['horovod_flat_s']:.3f} ms")
        for path, f in fits.items():
            print(f"{path}: ring model latency {1e6 * f['latency_s']:.0f} us per hop, "
                  f"bandwidth {f['bandwidth_Bps'] / 1e9:.2f} GB/s")
        result = {"world_size": world, "spans_hosts": dist.spans_hosts(),
                  "cycle_time_ms": os.environ.get("HOROVOD_CYCLE_TIME"), "load_avg": os.getloadavg(), "sizes": rows,
                  "grouped": grouped, "fit": fits}
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
    dist.shutdown()


if __name__ == "__main__":
    main()
