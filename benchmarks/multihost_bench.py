"""Across hosts: dtrain's hierarchical allreduce against flat gradients, torchrun DDP and plain Horovod.

    python benchmarks/multihost_bench.py                         # 10 and 1 Gbit/s, both models, 3 repeats
    python benchmarks/multihost_bench.py --rates 1gbit --models large --repeats 5 --json out.json

Runs on a test bed of two hosts (``launch/testbed.sh``: network namespaces, each pinned to its own
core; bed ``DTRAIN_TESTBED_ID``, default 7, so it can be up beside the tests' bed 0), 2 ranks per host,
global batch 128, in-memory data (the step alone, as B2 of ``python -m dtrain.bench``). Each host's
link is shaped with tbf to each ``--rates`` value (this kernel has no netem: no added delay).
Contenders, one comparison per rate and model, their order rotated every repeat:

* ``dtrain hier``: ``benchmarks/peers/dtrain_step.py`` under horovodrun, ``DTRAIN_ALLREDUCE=hier``
  (what ``auto`` picks across hosts): shared memory within each host, each shard across hosts over
  Gloo, the optimizer step sharded per host;
* ``dtrain flat gloo`` / ``dtrain flat horovod``: the same step with every rank's whole gradient over
  torch.distributed Gloo / over Horovod, each rank taking the whole optimizer step;
* ``ddp``: torchrun on both hosts (``--nnodes 2``), ``benchmarks/peers/ddp.py``;
* ``horovod plain``: ``benchmarks/peers/horovod_plain.py``, the pattern of Horovod's docs.

Bytes on the wire: rank 0 counts the bytes its host sends on the bed's interface during the timed
windows (``DTRAIN_BENCH_NIC``), per step, against the minimum of a ring over the hosts,
``2 (h-1)/h`` times the gradient's bytes. Prints one table per comparison (``dtrain.tools.benchstats``)
and the bytes; ``--json`` writes everything. Needs root (namespaces) and ``launch/setup.sh`` done.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks" / "peers"))
from _harness import MODELS, NIC_ENV  # noqa: E402

from dtrain.tools.bench import Contender, run_alternating  # noqa: E402
from dtrain.tools.benchstats import RatioSpec, compare, render_comparison, summarize  # noqa: E402

BED = os.environ.setdefault("DTRAIN_TESTBED_ID", "7")
SCRIPT = str(REPO / "launch" / "testbed.sh")
PEERS = REPO / "benchmarks" / "peers"
PYTHON = str(REPO / ".venv" / "bin" / "python")
HOROVODRUN = str(REPO / ".venv" / "bin" / "horovodrun")
NIC = "dt0"
HOSTS, PER_HOST = ("h1", "h2"), 2


def address(host: str) -> str:
    return f"10.77.{BED}.{10 + int(host[1:])}"


def testbed(*args: str) -> None:
    subprocess.run([SCRIPT, *args], check=True, capture_output=True, text=True)


def on(host: str, cmd: list[str]) -> list[str]:
    return [SCRIPT, "exec", host, *cmd]


def peer(script: str, model: str, o: argparse.Namespace) -> list[str]:
    return [PYTHON, str(PEERS / script), "--model", model, "--global-batch", "128", "--warmup", "5",
            "--windows", str(o.windows), "--window-seconds", str(o.window_seconds)]


def contenders(model: str, o: argparse.Namespace) -> list[Contender]:
    np = len(HOSTS) * PER_HOST
    hvd = [HOROVODRUN, "-np", str(np), "-H", ",".join(f"{h}:{PER_HOST}" for h in HOSTS), "--gloo",
           "--network-interfaces", NIC]
    step = on(HOSTS[0], [*hvd, *peer("dtrain_step.py", model, o)])
    wire = {NIC_ENV: NIC}
    cs = [Contender("dtrain hier", step, {**wire, "DTRAIN_ALLREDUCE": "hier"}),
          Contender("dtrain flat gloo", step, {**wire, "DTRAIN_ALLREDUCE": "torch"}),
          Contender("dtrain flat horovod", step, {**wire, "DTRAIN_ALLREDUCE": "horovod"}),
          Contender("horovod plain", on(HOSTS[0], [*hvd, *peer("horovod_plain.py", model, o)]), wire)]
    # torchrun on every host at once (static rendezvous at h1); rank 0, on h1, prints the result.
    port = 29400 + int(BED)
    runs = []
    for i, h in enumerate(HOSTS):
        torchrun = [PYTHON, "-m", "torch.distributed.run", "--nnodes", str(len(HOSTS)), "--node-rank", str(i),
                    "--nproc-per-node", str(PER_HOST), "--master-addr", address(HOSTS[0]), "--master-port", str(port),
                    *peer("ddp.py", model, o)[1:]]
        runs.append(" ".join(on(h, torchrun)))
    others = "".join(f"{r} >/dev/null 2>&1 & " for r in runs[1:])
    cs.append(Contender("ddp", ["bash", "-c", f"{others}{runs[0]}; wait"], {**wire, "GLOO_SOCKET_IFNAME": NIC}))
    return cs


def gradient_bytes(model: str) -> int:
    inputs, hidden, outputs = MODELS[model]
    widths = [inputs, *hidden, outputs]
    return 4 * sum(a * b + b for a, b in itertools.pairwise(widths))


def wire_table(comp: dict[str, Any], model: str) -> tuple[str, dict[str, Any]]:
    h = len(HOSTS)
    ring = 2 * (h - 1) / h * gradient_bytes(model)
    lines = [f"bytes sent per step by host {HOSTS[0]} (ring minimum over {h} hosts: {ring / 1e6:.3f} MB)",
             f"  {'contender':<22}{'MB/step':>10}{'/ ring min':>12}"]
    out = {"ring_minimum_bytes": ring, "contenders": {}}
    for name, c in comp["contenders"].items():
        sent = [e.get("tx_bytes_per_step") for e in c["extra"] if e.get("tx_bytes_per_step") is not None]
        if not sent:
            continue
        mid = sorted(sent)[len(sent) // 2]
        out["contenders"][name] = {"tx_bytes_per_step": sent, "median": mid, "over_ring": mid / ring}
        lines.append(f"  {name:<22}{mid / 1e6:>10.3f}{mid / ring:>12.2f}")
    return "\n".join(lines), out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rates", default="10gbit,1gbit", help="tbf rates of each host's link, comma-separated")
    ap.add_argument("--models", default="small,large")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--windows", type=int, default=5)
    ap.add_argument("--window-seconds", type=float, default=1.5)
    ap.add_argument("--json", help="write every run here")
    o = ap.parse_args()
    if os.geteuid() != 0:
        print("multihost_bench: error: needs root (the test bed's network namespaces)", file=sys.stderr)
        return 2
    testbed("up", str(len(HOSTS)))
    results: list[dict[str, Any]] = []
    try:
        for rate in o.rates.split(","):
            for h in HOSTS:
                testbed("shape", h, rate)
            for model in o.models.split(","):
                cs = contenders(model, o)
                print(f"{rate} {model}: {', '.join(c.name for c in cs)} x {o.repeats}", flush=True)
                runs = run_alternating(cs, o.repeats, lambda line: print(line, flush=True))
                summaries = {c.name: {**summarize(runs[c.name]), "command": " ".join(c.cmd), "env": c.env,
                                      "extra": [r.extra for r in runs[c.name]],
                                      "errors": [r.error for r in runs[c.name] if r.error]} for c in cs}
                specs = [RatioSpec("dtrain hier", "dtrain flat gloo", 1.5 if rate == "1gbit" else 1.0),
                         RatioSpec("dtrain hier", "dtrain flat horovod", 1.5 if rate == "1gbit" else 1.0),
                         RatioSpec("dtrain hier", "ddp", 1.3 if rate == "1gbit" else 1.0),
                         RatioSpec("dtrain hier", "horovod plain")]
                comp = {"benchmark": "multihost", "title": f"2 hosts x 2 ranks, links shaped to {rate}",
                        "model": model, "global_batch": 128, "baseline": "dtrain flat gloo",
                        "contenders": summaries, "ratios": compare(summaries, specs), "rate": rate}
                table, wire = wire_table(comp, model)
                comp["wire"] = wire
                print(render_comparison(comp) + "\n" + table + "\n", flush=True)
                for name, s in summaries.items():
                    for e in s["errors"]:
                        print(f"  {name} failed: {e[-1500:]}", flush=True)
                results.append(comp)
    finally:
        for h in HOSTS:
            subprocess.run([SCRIPT, "shape", h, "off"], capture_output=True)
    if o.json:
        Path(o.json).write_text(json.dumps({"when": time.strftime("%Y-%m-%d %H:%M"), "comparisons": results},
                                           indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
