"""Benchmark suite: dtrain against its peers, each comparison in one invocation, contenders alternated.

    python -m dtrain.bench                       # B1..B6, both models
    python -m dtrain.bench B2 B3 --quick         # a short pass of two benchmarks
    python -m dtrain.bench B1 --models small --repeats 5 --json bench-results/b1.json

Benchmarks (targets in brackets; a ratio is dtrain's median samples/s over the other's):

* **B1 overhead** [dtrain step / bare, paired in one process >= 0.95]: one rank. dtrain's training step
  (the code path the trainer takes per step, on in-memory tensors: ``benchmarks/peers/dtrain_step.py``)
  against a bare PyTorch loop on the same tensors, model and batch (``benchmarks/peers/bare.py``): as
  separate processes, and both in one process timed in alternating windows (``peers/paired.py``: a
  2-core VM's speed swings up to 2x from one process to the next, so only pairs compare the steps
  alone; the target is judged there); and the
  end-to-end ``python -m dtrain`` (Dask stream included) steady-state samples/s, so the stream's cost
  shows as ``dtrain e2e / dtrain step``.
* **B2 peers** [dtrain step / DDP >= 1.0, dtrain step / plain Horovod >= 1.0]: 2 ranks, global batch
  128: dtrain's step under horovodrun, torchrun DDP over Gloo (``peers/ddp.py``), the plain Horovod
  pattern of its docs (``peers/horovod_plain.py``: ``DistributedSampler`` + ``DataLoader`` +
  ``hvd.DistributedOptimizer``, untuned), the same tuned (``OMP_NUM_THREADS=1 HOROVOD_CYCLE_TIME=0.1``)
  and with its example's ``torch.set_num_threads(1)``; dtrain's step with Gloo carrying the gradients
  instead of shared memory (``DTRAIN_ALLREDUCE=torch``: what the transport is worth); and
  ``horovodrun ... python -m dtrain`` end to end.
* **B3 ceiling** [dtrain step, 2 ranks / one bare process on all cores >= 0.8]: the same global batch.
* **B4 input streaming** [stream / pyarrow >= 0.8, data stall <= 0.05 of step time], **B5 checkpoint**
  [async blocking / sync save <= 0.10], **B6 elastic recovery** [seconds, no target]:
  ``benchmarks/stream_bench.py``, ``benchmarks/checkpoint_bench.py`` and ``benchmarks/elastic_bench.py``
  run as they are, their JSON included and their targets judged from it.

Every comparison runs on two models: ``small`` (100-256-256-10, latency-bound) and ``large``
(100-2048-2048-10, compute-bound). Each contender is a fresh process (or horovodrun/torchrun job) that
times several windows of about a second after a warm-up; a run's figure is the median of its windows.
Runs are repeated ``--repeats`` times with the contenders' order rotated each time, so a burst of load
from other processes falls on all of them alike; the table shows the median over runs, the best run
and the 1-minute load average seen. The shell's ``OMP_NUM_THREADS``, ``HOROVOD_*`` and ``DTRAIN_ALLREDUCE``
tuning variables are removed from every contender's environment (``--dtrain-env`` sets some for dtrain's contenders).

Prints a table per comparison and whether each target is met; ``--json`` writes everything. A
benchmark prints numbers, it never fails on them: the exit status is 0 unless a contender crashed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dtrain.tools import benchstats
from dtrain.tools.benchstats import (
    MODELS,
    RESULT_PREFIX,
    RatioSpec,
    Run,
    compare,
    median,
    parse_result,
    render_comparison,
    render_targets,
    rotation,
    steady_state,
    summarize,
    targets,
)
from dtrain.tools.report import ReportError, read_metrics

REPO = Path(__file__).resolve().parents[2]
PEERS = REPO / "benchmarks" / "peers"
BENCHMARKS = ("B1", "B2", "B3", "B4", "B5", "B6")
TITLES = {
    "B1": "overhead: dtrain on 1 rank vs a bare PyTorch loop",
    "B2": "peers: dtrain on 2 ranks vs torchrun DDP and plain Horovod",
    "B3": "ceiling: dtrain on 2 ranks vs one bare process on all cores",
    "B4": "input streaming (benchmarks/stream_bench.py)",
    "B5": "checkpoint (benchmarks/checkpoint_bench.py)",
    "B6": "elastic recovery (benchmarks/elastic_bench.py)",
}
# Variables that tune threads or Horovod: removed from every contender's environment unless it sets them.
TUNING_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "HOROVOD_CYCLE_TIME", "HOROVOD_FUSION_THRESHOLD",
               "HOROVOD_AUTOTUNE", "HOROVOD_AUTOTUNE_LOG", "HOROVOD_TIMELINE", "HOROVOD_TIMELINE_MARK_CYCLES",
               "HOROVOD_CACHE_CAPACITY", "DTRAIN_ALLREDUCE")
TUNED_HOROVOD = {"OMP_NUM_THREADS": "1", "HOROVOD_CYCLE_TIME": "0.1"}


# The pure logic (parsing, statistics, ratios, targets, tables) is dtrain/tools/benchstats.py.






































# -- running contenders ----------------------------------------------------------------------------------


@dataclass
class Contender:
    """One way to train, as a command line; ``run_dir`` contenders report through dtrain's run directory."""

    name: str
    cmd: list[str]
    env: dict[str, str] = field(default_factory=dict)
    run_dir: str | None = None  # python -m dtrain: steady-state samples/s from metrics.jsonl
    timeout: float = 600.0


def contender_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in TUNING_VARS}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def run_once(c: Contender) -> Run:
    load = os.getloadavg()[0]
    if c.run_dir:
        shutil.rmtree(c.run_dir, ignore_errors=True)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(c.cmd, cwd=REPO, env=contender_env(c.env), capture_output=True, text=True,
                              timeout=c.timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return Run(c.name, None, load=load, seconds=time.perf_counter() - t0, error=f"timed out after {c.timeout} s")
    seconds = time.perf_counter() - t0
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        return Run(c.name, None, load=load, seconds=seconds, error=f"exit {proc.returncode}\n{output[-3000:]}")
    if c.run_dir:
        try:
            metrics, _ = read_metrics(Path(c.run_dir, "metrics.jsonl"))
            summary = json.loads(Path(c.run_dir, "summary.json").read_text())
        except (OSError, ReportError) as e:
            return Run(c.name, None, load=load, seconds=seconds, error=f"no run directory output ({e})")
        windows = steady_state(metrics)
        extra = {"summary_samples_per_sec": summary.get("samples_per_sec"), "wall_seconds": summary.get("wall_seconds"),
                 "steps": summary.get("steps")}
        return Run(c.name, median(windows), windows, load, seconds, extra=extra)
    result = parse_result(output)
    if result is None:
        return Run(c.name, None, load=load, seconds=seconds, error=f"no {RESULT_PREFIX.strip()} line\n{output[-3000:]}")
    windows = [float(v) for v in result.get("samples_per_sec", [])]
    extra = {k: v for k, v in result.items() if k not in ("samples_per_sec", "contender")}
    return Run(c.name, median(windows), windows, load, seconds, extra=extra)


def run_alternating(contenders: Sequence[Contender], repeats: int,
                    log: Callable[[str], None] = print) -> dict[str, list[Run]]:
    """Every contender ``repeats`` times, the order rotated each repeat (see ``rotation``)."""
    by_name = {c.name: c for c in contenders}
    runs: dict[str, list[Run]] = {c.name: [] for c in contenders}
    for rep in range(repeats):
        for name in rotation(list(by_name), rep):
            r = run_once(by_name[name])
            runs[name].append(r)
            shown = benchstats.number(r.samples_per_sec) + " samples/s" if r.samples_per_sec is not None else "FAILED"
            log(f"    [{rep + 1}/{repeats}] {name:<22} {shown:>20}  ({r.seconds:.0f} s, load {r.load:.1f})")
    return runs


# -- the benchmarks --------------------------------------------------------------------------------------


@dataclass
class Options:
    repeats: int
    quick: bool
    global_batch: int
    models: list[str]
    dtrain_env: dict[str, str]
    workdir: str
    horovodrun: str
    python: str = sys.executable

    def window_args(self) -> list[str]:
        if self.quick:
            return ["--warmup", "5", "--windows", "2", "--window-seconds", "0.5"]
        return ["--warmup", "10", "--windows", "5", "--window-seconds", "1.0"]


def _peer(o: Options, script: str, model: str, *extra: str) -> list[str]:
    return [o.python, str(PEERS / script), "--model", model, "--global-batch", str(o.global_batch),
            *o.window_args(), *extra]


def _hvd(o: Options, np: int) -> list[str]:
    return [o.horovodrun, "-np", str(np), "-H", f"localhost:{np}", "--gloo"]


def _e2e(o: Options, name: str, model: str, np: int) -> Contender:
    """``python -m dtrain`` on generated data of the model's shape (100 features, 10 classes)."""
    hidden = {"small": "256,256", "large": "2048,2048"}[model]
    steps = {("small", False): 1500, ("small", True): 300, ("large", False): 120, ("large", True): 30}[model, o.quick]
    log_every = max(5, steps // 12)
    rows = int(steps * o.global_batch / 0.85) + 1000  # the training split is ~90% of the rows
    run_dir = os.path.join(o.workdir, f"{name}-{model}")
    args = ["-m", "dtrain", "--gen-rows", str(rows), "--gen-features", "100", "--gen-classes", "10",
            "--gen-partitions", "16", "--hidden", hidden, "--global-batch-size", str(o.global_batch),
            "--optimizer", "sgd", "--momentum", "0.9", "--lr", "0.01", "--epochs", "1", "--max-steps", str(steps),
            "--log-every", str(log_every), "--run-dir", run_dir, "--resume", "never"]
    cmd = [o.python, *args] if np == 1 else [*_hvd(o, np), o.python, *args]
    return Contender(name, cmd, dict(o.dtrain_env), run_dir=run_dir)


def contenders(bench: str, model: str, o: Options) -> tuple[list[Contender], str, list[RatioSpec]]:
    """The contenders of one comparison, its baseline (the table's "vs" column) and its ratios."""
    dtrain_step_1 = Contender("dtrain step", _peer(o, "dtrain_step.py", model), dict(o.dtrain_env))
    dtrain_step_2 = Contender("dtrain step", [*_hvd(o, 2), *_peer(o, "dtrain_step.py", model)], dict(o.dtrain_env))
    bare = Contender("bare", _peer(o, "bare.py", model))
    if bench == "B1":
        # The target is judged on the paired run: both steps in one process, so that the process-to-process
        # swing of a shared machine (up to 2x here) does not decide it. The separate processes' ratio
        # stands beside it.
        paired = Contender("dtrain step, paired", _peer(o, "paired.py", model), dict(o.dtrain_env))
        cs = [bare, dtrain_step_1, paired, _e2e(o, "dtrain e2e", model, 1)]
        specs = [RatioSpec("dtrain step, paired", "bare", 0.95, paired=True), RatioSpec("dtrain step", "bare"),
                 RatioSpec("dtrain e2e", "bare"), RatioSpec("dtrain e2e", "dtrain step")]
        return cs, "bare", specs
    if bench == "B2":
        plain = Contender("horovod plain", [*_hvd(o, 2), *_peer(o, "horovod_plain.py", model)])
        tuned = Contender("horovod tuned", [*_hvd(o, 2), *_peer(o, "horovod_plain.py", model)], dict(TUNED_HOROVOD))
        example = Contender("horovod example", [*_hvd(o, 2), *_peer(o, "horovod_plain.py", model, "--threads-1")])
        ddp = Contender("ddp", [o.python, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                                *_peer(o, "ddp.py", model)[1:]])
        cs = [dtrain_step_2, ddp, plain, tuned]
        specs = [RatioSpec("dtrain step", "ddp", 1.0), RatioSpec("dtrain step", "horovod plain", 1.0),
                 RatioSpec("dtrain step", "horovod tuned")]
        if not o.quick:
            # dtrain with Gloo carrying the gradients instead of shared memory: what the transport is worth.
            gloo = Contender("dtrain step gloo", dtrain_step_2.cmd, {**o.dtrain_env, "DTRAIN_ALLREDUCE": "torch"})
            cs += [example, gloo]
            specs += [RatioSpec("dtrain step", "horovod example"), RatioSpec("dtrain step gloo", "ddp")]
        cs.append(_e2e(o, "dtrain e2e", model, 2))
        specs += [RatioSpec("dtrain e2e", "ddp"), RatioSpec("dtrain e2e", "dtrain step")]
        return cs, "ddp", specs
    if bench == "B3":
        cs = [bare, dtrain_step_2, _e2e(o, "dtrain e2e", model, 2)]
        specs = [RatioSpec("dtrain step", "bare", 0.8), RatioSpec("dtrain e2e", "bare")]
        return cs, "bare", specs
    raise ValueError(f"no contenders for {bench}")


def run_comparisons(bench: str, o: Options, log: Callable[[str], None]) -> dict[str, Any]:
    comparisons = []
    for model in o.models:
        cs, baseline, specs = contenders(bench, model, o)
        log(f"{bench} {model}: {', '.join(c.name for c in cs)} x {o.repeats}")
        runs = run_alternating(cs, o.repeats, log)
        summaries = {c.name: {**summarize(runs[c.name]), "command": " ".join(c.cmd),
                              "env": c.env, "extra": [r.extra for r in runs[c.name]]} for c in cs}
        comp = {"benchmark": bench, "title": TITLES[bench], "model": model, "global_batch": o.global_batch,
                "baseline": baseline, "contenders": summaries, "ratios": compare(summaries, specs)}
        log(render_comparison(comp) + "\n")
        comparisons.append(comp)
    return {"title": TITLES[bench], "status": "ok", "comparisons": comparisons}


def run_script_bench(bench: str, script: str, quick_args: list[str], o: Options,
                     log: Callable[[str], None]) -> dict[str, Any]:
    """A benchmark script of its own (``--json``), run as it is; missing scripts are reported as such."""
    path = REPO / "benchmarks" / script
    if not path.is_file():
        log(f"{bench} {TITLES[bench]}: benchmarks/{script} not present, skipped\n")
        return {"title": TITLES[bench], "status": "missing", "script": f"benchmarks/{script}"}
    out = os.path.join(o.workdir, f"{bench}.json")
    attempts = [[*quick_args]] if o.quick else [[]]
    if o.quick:
        attempts.append([])  # the script may not know the quick flags: run it as it is
    proc = None
    for extra in attempts:
        cmd = [o.python, str(path), "--json", out, *extra]
        log(f"{bench} {TITLES[bench]}: {' '.join(cmd[1:])}")
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, env=contender_env({}), capture_output=True, text=True, timeout=1800,
                              stdin=subprocess.DEVNULL)
        if not (proc.returncode == 2 and "unrecognized arguments" in proc.stderr):
            break
    assert proc is not None
    seconds = time.perf_counter() - t0
    if proc.returncode != 0 or not os.path.isfile(out):
        log(f"  failed (exit {proc.returncode}): {(proc.stdout + proc.stderr)[-1500:]}\n")
        return {"title": TITLES[bench], "status": "failed", "command": " ".join(cmd), "exit": proc.returncode,
                "output": (proc.stdout + proc.stderr)[-3000:]}
    log(proc.stdout.rstrip() + "\n")
    with open(out) as f:
        result = json.load(f)
    return {"title": TITLES[bench], "status": "ok", "command": " ".join(cmd), "seconds": seconds,
            "load": os.getloadavg()[0], "stdout": proc.stdout, "result": result}


def machine() -> dict[str, Any]:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform(), "cores": cores}
    for mod in ("torch", "horovod", "dask"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # not installed, or broken: the benchmark says so in its own failure
            info[mod] = None
    return info


def run(selected: Sequence[str], o: Options, log: Callable[[str], None] = print) -> dict[str, Any]:
    report: dict[str, Any] = {"started": datetime.datetime.now().isoformat(timespec="seconds"),
                              "machine": machine(), "load_start": list(os.getloadavg()),
                              "settings": {"repeats": o.repeats, "quick": o.quick, "global_batch": o.global_batch,
                                           "models": o.models, "dtrain_env": o.dtrain_env},
                              "benchmarks": {}}
    for bench in selected:
        if bench in ("B1", "B2", "B3"):
            report["benchmarks"][bench] = run_comparisons(bench, o, log)
        elif bench == "B4":
            report["benchmarks"][bench] = run_script_bench(
                bench, "stream_bench.py", ["--rows", "100000", "--partitions", "8"], o, log)
        elif bench == "B5":
            report["benchmarks"][bench] = run_script_bench(
                bench, "checkpoint_bench.py", ["--repeat", "3", "--width", "1024"], o, log)
        elif bench == "B6":
            report["benchmarks"][bench] = run_script_bench(bench, "elastic_bench.py", ["--repeat", "1"], o, log)
    report["load_end"] = list(os.getloadavg())
    report["targets"] = targets(report)
    return report


def _env_pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dtrain.bench", description=__doc__.splitlines()[0])
    ap.add_argument("benchmarks", nargs="*", metavar="B",
                    help=f"benchmarks to run ({' '.join(BENCHMARKS)}; default all)")
    ap.add_argument("--quick", action="store_true", help="one short run per contender (smoke test, noisy)")
    ap.add_argument("--repeats", type=int, default=None, help="runs per contender (default 3, --quick 1)")
    ap.add_argument("--models", default="small,large", help="comma-separated: small, large")
    ap.add_argument("--global-batch", type=int, default=128)
    ap.add_argument("--dtrain-env", type=_env_pair, action="append", default=[], metavar="KEY=VALUE",
                    help="environment of dtrain's contenders only (e.g. HOROVOD_CYCLE_TIME=0.05); repeatable")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    selected = [b.upper() for b in args.benchmarks] or list(BENCHMARKS)
    unknown = [b for b in selected if b not in BENCHMARKS]
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if unknown or not models or any(m not in MODELS for m in models):
        ap.error(f"benchmarks are {', '.join(BENCHMARKS)} and models {', '.join(MODELS)}")
    repeats = args.repeats or (1 if args.quick else 3)
    horovodrun = shutil.which("horovodrun", path=str(Path(sys.executable).parent)) or "horovodrun"
    with tempfile.TemporaryDirectory(prefix="dtrain-bench-") as workdir:
        o = Options(repeats, args.quick, args.global_batch, models, dict(args.dtrain_env), workdir, horovodrun)
        report = run(selected, o)
    if report["targets"]:
        print("targets (ratios of medians of samples/s, fractions of time; load 1-min avg "
              f"{report['load_start'][0]:.1f} at start, {report['load_end'][0]:.1f} at end):")
        print(render_targets(report["targets"]))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {args.json}")
    failed = any(s.get("failed") for b in report["benchmarks"].values() for comp in b.get("comparisons", [])
                 for s in comp["contenders"].values()) or any(b.get("status") == "failed"
                                                             for b in report["benchmarks"].values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
