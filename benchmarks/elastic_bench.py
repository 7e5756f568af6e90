"""Elastic recovery: seconds from a rank's SIGKILL to the next step trained by the smaller world.

    .venv/bin/python benchmarks/elastic_bench.py [--repeat 3] [--json out.json]

Each repeat starts a real elastic job on this host, as the elastic tests do: ``horovodrun -np 2
--min-np 1`` with ``launch/discover_hosts.py`` over a hosts file naming this machine twice
(``localhost`` and ``127.0.0.1``, one slot each), dtrain's settings for a fast recovery on localhost
(``--gloo-timeout-seconds 10``, ``--network-interfaces lo``) and a Dask ``LocalCluster`` that outlives
the ranks. Once the job has trained ``--kill-at`` steps, the rank on ``127.0.0.1`` is SIGKILLed;
recovery is the time from the kill to the first metrics line logged by the world of one (each step
is logged). "rolled back" counts the steps trained again after the rollback to the last commit.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from dtrain.tools.report import read_metrics

REPO = Path(__file__).resolve().parent.parent
HOROVODRUN = str(Path(sys.executable).parent / "horovodrun")


def lines(run: Path) -> list[dict[str, Any]]:
    """The step lines the job has logged so far."""
    path = run / "metrics.jsonl"
    return [m for m in read_metrics(path)[0] if "loss" in m] if path.exists() else []


def wait(what: str, check: Any, proc: subprocess.Popen[bytes], timeout: float = 300) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        if proc.poll() is not None:
            raise RuntimeError(f"the job ended (exit {proc.returncode}) before {what}")
        time.sleep(0.02)
    raise RuntimeError(f"{what}: not within {timeout} s")


def one_recovery(scheduler: str, work: Path, args: argparse.Namespace) -> dict[str, float]:
    hosts, run = work / "hosts", work / "run"
    hosts.write_text("localhost:1\n127.0.0.1:1\n")
    cmd = [HOROVODRUN, "-np", "2", "--min-np", "1", "--max-np", "2",
           "--host-discovery-script", str(REPO / "launch" / "discover_hosts.py"), "--network-interfaces", "lo",
           "--gloo-timeout-seconds", "10", sys.executable, "-m", "dtrain", "--scheduler", scheduler,
           "--run-dir", str(run), "--gen-rows", str(args.rows), "--global-batch-size", "64", "--epochs", "50",
           "--log-every", "1", "--commit-every", str(args.commit_every), "--progress-seconds", "3600"]
    env = dict(os.environ, DTRAIN_HOSTS_FILE=str(hosts))
    with open(work / "log.txt", "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        wait(f"step {args.kill_at}", lambda: any(m["step"] >= args.kill_at for m in lines(run)), proc)
        victim = wait("the rank on 127.0.0.1", lambda: next(
            (p for p in psutil.Process(proc.pid).children(recursive=True)
             if "dtrain" in " ".join(p.cmdline()) and p.environ().get("HOROVOD_HOSTNAME") == "127.0.0.1"), None), proc)
        seen = len(lines(run))
        last_step = lines(run)[-1]["step"]
        killed = time.time()
        os.kill(victim.pid, signal.SIGKILL)
        first = wait("a step on one rank", lambda: next(
            (m for m in lines(run)[seen:] if m["world_size"] == 1), None), proc)
        return {"recovery_s": first["time"] - killed, "rolled_back_steps": max(0, last_step + 1 - first["step"])}
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--kill-at", type=int, default=100, help="kill a rank once this step is logged")
    ap.add_argument("--commit-every", type=int, default=20)
    ap.add_argument("--json", help="write results here")
    args = ap.parse_args()
    from distributed import LocalCluster

    from dtrain.cluster import worker_environment

    results = []
    with worker_environment():  # the workers' malloc settings of dtrain's own clusters
        cluster = LocalCluster(n_workers=1, threads_per_worker=2, dashboard_address=":0", host="127.0.0.1")
    with cluster:
        for i in range(args.repeat):
            with tempfile.TemporaryDirectory() as d:
                r = one_recovery(cluster.scheduler_address, Path(d), args)
            print(f"  [{i + 1}/{args.repeat}] recovery {r['recovery_s']:.2f} s, "
                  f"{r['rolled_back_steps']:.0f} steps rolled back", flush=True)
            results.append(r)
    med = statistics.median(r["recovery_s"] for r in results)
    print(f"elastic recovery (SIGKILL of 1 of 2 ranks -> next step on 1 rank), median of {args.repeat}: "
          f"{med:.2f} s (best {min(r['recovery_s'] for r in results):.2f}, "
          f"worst {max(r['recovery_s'] for r in results):.2f}); commits every {args.commit_every} steps")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"recovery_s": med, "runs": results, "commit_every": args.commit_every}, f, indent=1)


if __name__ == "__main__":
    main()
