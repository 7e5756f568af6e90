"""dtrain's GPU path checked on one GPU machine, prepared here and run there in one command.

    python benchmarks/gpu_check.py prepare [--dir .gpu] [--dry-run]     # here: wheels + Horovod's sdist
    python benchmarks/gpu_check.py run --out DIR [--device cuda|cpu] [--quick] [--only amp,b1] [--seconds N]
    python benchmarks/gpu_check.py table DIR/gpu_check.json               # the table of a run's JSON

``benchmarks/gpu_check.sh`` is the one command on the GPU machine: it installs what ``prepare`` put in
``.gpu/``, builds Horovod with NCCL there, then calls ``run``. The machine's image has CUDA torch, pyarrow,
pandas and fsspec but no Dask and no Horovod, and reaches no package registry, so ``prepare`` downloads
the Python 3.12 wheels of what it lacks, pinned to the versions of this interpreter (the project's venv),
and Horovod's sdist, into one ignored folder that travels with the working tree.

The checks (``run``), each with its share of ``--seconds`` (what one check leaves goes to the next):

* ``amp``: ``horovodrun -np 1 python -m dtrain`` on the GPU in float32 and with ``--amp``, and on the CPU
  (``CUDA_VISIBLE_DEVICES=``) beside them: loss curves close (mean relative gap <= ``LOSS_GAP``) and
  ``eval_accuracy`` within ``ACCURACY_GAP`` (a point).
* ``b1``: dtrain's step against a bare PyTorch loop on the same device, paired in one process
  (``benchmarks/peers/paired.py``, as B1 on the CPU): the large MLP, and a bigger one (``xlarge``,
  batch 2048) that keeps a GPU busy.
* ``stall``: the data stall share of a real run on generated Parquet streamed by Dask, with the rows in
  pinned host memory and copied ``non_blocking`` (dtrain's default on a GPU) and without
  (``DTRAIN_PIN_MEMORY=0``); target < 5%.
* ``checkpoint``: periodic async checkpoints of GPU tensors; the whole run SIGKILLed after one, rerun with
  the same command: the same ``model_sha256`` as an uninterrupted run.

Every check writes what it measured into ``DIR/gpu_check.json`` as soon as it ends (a check that fails
or runs out of time records its error and the next one runs), the subprocesses' output goes to
``DIR/runs.log``, and a table is printed at the end. ``--device cpu`` runs the same code paths on a CPU
(what CI does, with ``--quick``); ``--quick`` shrinks every size to seconds of work.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
PEERS = REPO / "benchmarks" / "peers"

# What the device image lacks (Dask and what Dask needs beyond it), pinned to this interpreter's
# versions; cmake 3.x because Horovod 0.28.1's CMake files (and gloo's, 2.8.12) predate cmake 4, which
# the image's cmake may be.
CARRIED = ("dask", "distributed", "partd", "locket", "tblib", "tornado", "zict")
CMAKE_VERSION = "3.31.10"
HOROVOD_VERSION = "0.28.1"  # launch/setup.sh's
PYTHON_VERSION = "3.12"  # the device image's
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux_2_5_x86_64", "manylinux1_x86_64")
# The device tool carries the working tree and these files together up to 64 MiB: leave the repository
# and the run's own files room.
CARRY_LIMIT = 48 << 20

CHECKS = ("amp", "b1", "stall", "checkpoint")
# Shares of --seconds, in the order the checks run.
SHARES = {"amp": 3, "b1": 2, "stall": 2, "checkpoint": 3}
LOSS_GAP = 0.05  # mean relative gap of two loss curves still called close
ACCURACY_GAP = 0.01  # eval_accuracy within a point
STALL_TARGET = 0.05
RESULT_PREFIX = "BENCH_RESULT "  # benchmarks/peers/_harness.py's result line


# ---------------------------------------------------------------------------------------------------
# prepare


@dataclass(frozen=True)
class Download:
    """One file the device needs, and whether ``prepare`` already has it."""

    name: str
    version: str
    kind: str  # "wheel" or "sdist"
    present: Path | None  # the file in the folder, if there

    @property
    def spec(self) -> str:
        return f"{self.name}=={self.version}"


def pinned_versions(names: Sequence[str] = CARRIED) -> dict[str, str]:
    """``name -> version`` as installed in this interpreter (the project's venv): the device runs the same."""
    try:
        return {n: importlib.metadata.version(n) for n in names}
    except importlib.metadata.PackageNotFoundError as e:
        raise SystemExit(f"gpu_check: error: prepare: {e.name} is not installed here; "
                         "run launch/setup.sh first") from None


def _normalize(name: str) -> str:
    from packaging.utils import canonicalize_name

    return str(canonicalize_name(name))


def _file_of(path: Path) -> tuple[str, str, str] | None:
    """(canonical name, version, kind) of a wheel or sdist file name, None for anything else."""
    from packaging.utils import InvalidSdistFilename, InvalidWheelFilename, parse_sdist_filename, parse_wheel_filename

    try:
        if path.name.endswith(".whl"):
            name, version, _, _ = parse_wheel_filename(path.name)
            return str(name), str(version), "wheel"
        if path.name.endswith((".tar.gz", ".zip")):
            name, version = parse_sdist_filename(path.name)
            return str(name), str(version), "sdist"
    except (InvalidWheelFilename, InvalidSdistFilename):
        return None
    return None


def plan(folder: Path, versions: dict[str, str]) -> tuple[list[Download], list[Path]]:
    """The files ``folder`` must hold (each marked present or not), and the files in it to remove: other
    versions of the same packages (two versions of one stop the whole install there) and strays."""
    wanted = [(n, v, "wheel") for n, v in versions.items()] + [("cmake", CMAKE_VERSION, "wheel"),
                                                              ("horovod", HOROVOD_VERSION, "sdist")]
    have: dict[tuple[str, str, str], Path] = {}
    stale: list[Path] = []
    keys = {(_normalize(n), v, k) for n, v, k in wanted}
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        parsed = _file_of(path)
        if parsed in keys:
            have[parsed] = path
        elif path.is_file():
            stale.append(path)
    return [Download(n, v, k, have.get((_normalize(n), v, k))) for n, v, k in wanted], stale


def pip_download(d: Download, folder: Path) -> list[str]:
    """The pip command that puts ``d`` into ``folder``: a wheel for CPython 3.12 on x86-64 Linux, or the sdist."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
           "-d", str(folder)]
    if d.kind == "sdist":
        return [*cmd, "--no-binary", ":all:", d.spec]
    cmd += ["--only-binary", ":all:", "--python-version", PYTHON_VERSION, "--implementation", "cp"]
    for p in PLATFORMS:
        cmd += ["--platform", p]
    return [*cmd, d.spec]


def prepare(folder: Path, dry_run: bool) -> int:
    versions = pinned_versions()
    downloads, stale = plan(folder, versions)
    for path in stale:
        print(f"remove   {path.name}")
        if not dry_run:
            path.unlink()
    for d in downloads:
        print(f"{'have    ' if d.present else 'download'} {d.spec} ({d.kind})")
        if not d.present and not dry_run:
            folder.mkdir(parents=True, exist_ok=True)
            subprocess.run(pip_download(d, folder), check=True)
    if dry_run:
        return 0
    missing = [d.spec for d in plan(folder, versions)[0] if d.present is None]
    if missing:
        raise SystemExit(f"gpu_check: error: prepare: {', '.join(missing)} not in {folder} after pip download; "
                         "see pip's messages above")
    total = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    print(f"{folder}: {total / 2**20:.1f} MiB of {CARRY_LIMIT >> 20} MiB allowed")
    if total > CARRY_LIMIT:
        raise SystemExit(f"gpu_check: error: prepare: {folder} holds {total / 2**20:.1f} MiB, over "
                         f"{CARRY_LIMIT >> 20} MiB; the device tool carries 64 MiB with the working tree")
    return 0


# ---------------------------------------------------------------------------------------------------
# run: budgets, processes, figures


class Budget:
    """The seconds left to the whole run, shared among the checks still to run by their ``SHARES``."""

    def __init__(self, seconds: float, checks: Sequence[str]):
        self.deadline = time.monotonic() + seconds
        self.pending = list(checks)

    def left(self) -> float:
        return max(0.0, self.deadline - time.monotonic())

    def take(self, check: str) -> float:
        """Seconds for ``check`` (removed from the pending ones): its share of what is left."""
        total = sum(SHARES[c] for c in self.pending)
        share = self.left() * SHARES[check] / total
        self.pending.remove(check)
        return share


class CheckTimeout(Exception):
    pass


class Runner:
    """Runs a check's subprocesses against its deadline; their output is appended to one log."""

    def __init__(self, log: Path, device: str):
        self.log = log
        self.device = device
        self.deadline = time.monotonic()

    def env(self, extra: dict[str, str] | None = None, gpu: bool = True) -> dict[str, str]:
        env = dict(os.environ, PYTHONUNBUFFERED="1", DTRAIN_LOG_LEVEL="INFO",
                   # cuBLAS picks its reduction order per workspace; a fixed one makes a rerun's bits equal.
                   CUBLAS_WORKSPACE_CONFIG=":4096:8")
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
        if not gpu or self.device == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""
        env.update(extra or {})
        return env

    def left(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 1:
            raise CheckTimeout("out of time")
        return left

    def start(self, cmd: Sequence[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        with self.log.open("ab") as f:
            f.write(f"\n$ {' '.join(cmd)}\n".encode())
        out = self.log.open("ab")
        # A session of its own: a timeout or a planned SIGKILL ends every process of the job at once
        # (horovodrun, the rank, the Dask workers), as a machine failing would.
        proc = subprocess.Popen(list(cmd), cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        out.close()
        return proc

    def wait(self, proc: subprocess.Popen[bytes], what: str) -> None:
        try:
            code = proc.wait(timeout=self.left())
        except subprocess.TimeoutExpired:
            kill(proc)
            raise CheckTimeout(f"{what}: still running at the check's deadline") from None
        if code != 0:
            raise RuntimeError(f"{what}: exit {code} (see runs.log)")

    def run(self, cmd: Sequence[str], env: dict[str, str], what: str) -> None:
        self.wait(self.start(cmd, env), what)

    def output_of(self, cmd: Sequence[str], env: dict[str, str], what: str) -> str:
        try:
            proc = subprocess.run(list(cmd), cwd=REPO, env=env, capture_output=True, text=True,
                                  stdin=subprocess.DEVNULL, timeout=self.left(), start_new_session=True)
        except subprocess.TimeoutExpired:
            raise CheckTimeout(f"{what}: still running at the check's deadline") from None
        with self.log.open("a") as f:
            f.write(f"\n$ {' '.join(cmd)}\n{proc.stdout}{proc.stderr}")
        if proc.returncode != 0:
            raise RuntimeError(f"{what}: exit {proc.returncode} (see runs.log)")
        return proc.stdout


def kill(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the session ``proc`` leads: every process of the job at once."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def horovodrun() -> str:
    here = shutil.which("horovodrun", path=str(Path(sys.executable).parent))
    return here or shutil.which("horovodrun") or "horovodrun"


def dtrain_cmd(args: Sequence[str], ranks: int | None = None) -> list[str]:
    """``python -m dtrain ARGS``, under ``horovodrun -np ranks`` when ``ranks`` is given."""
    cmd = [sys.executable, "-m", "dtrain", *args]
    return [horovodrun(), "-np", str(ranks), "-H", f"localhost:{ranks}", "--gloo", *cmd] if ranks else cmd


def read_run(run_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A finished run's ``summary.json`` and its training records of ``metrics.jsonl`` (those with a loss)."""
    summary = json.loads((run_dir / "summary.json").read_text())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return summary, [r for r in records if "loss" in r and "step" in r]


def curve(records: list[dict[str, Any]]) -> dict[int, float]:
    return {int(r["step"]): float(r["loss"]) for r in records}


def curve_gap(a: dict[int, float], b: dict[int, float]) -> float | None:
    """Mean relative gap of curve ``a`` to curve ``b`` over the steps both logged."""
    steps = sorted(a.keys() & b.keys())
    if not steps:
        return None
    return statistics.fmean(abs(a[s] - b[s]) / max(abs(b[s]), 1e-12) for s in steps)


def parse_result(output: str) -> dict[str, Any] | None:
    """The ``BENCH_RESULT {json}`` line of a contender's output."""
    for line in reversed(output.splitlines()):
        at = line.find(RESULT_PREFIX)
        if at >= 0:
            with contextlib.suppress(json.JSONDecodeError):
                value = json.loads(line[at + len(RESULT_PREFIX):])
                if isinstance(value, dict):
                    return value
    return None


def checkpoints(run_dir: Path) -> list[int]:
    """Steps of the complete checkpoints of a run (``MANIFEST.json`` is written last)."""
    found = []
    for manifest in (run_dir / "checkpoints").glob("step-*/MANIFEST.json"):
        with contextlib.suppress(ValueError):
            found.append(int(manifest.parent.name.removeprefix("step-")))
    return sorted(found)


# ---------------------------------------------------------------------------------------------------
# the checks: each returns its figures, and sets "ok" to whether its target was met


def check_amp(r: Runner, work: Path, quick: bool) -> dict[str, Any]:
    rows, epochs = (4096, 1) if quick else (65536, 2)
    args = ["--gen-rows", str(rows), "--gen-partitions", "8", "--hidden", "256,256", "--epochs", str(epochs),
            "--global-batch-size", "256", "--log-every", "10", "--seed", "0"]
    runs: dict[str, dict[str, Any]] = {}
    curves: dict[str, dict[int, float]] = {}
    for name, extra, gpu in (("cpu", [], False), ("gpu", [], True), ("gpu_amp", ["--amp"], True)):
        run_dir = work / f"amp-{name}"
        t0 = time.monotonic()
        r.run(dtrain_cmd([*args, *extra, "--run-dir", str(run_dir)], ranks=1), r.env(gpu=gpu), f"amp: {name}")
        summary, records = read_run(run_dir)
        curves[name] = curve(records)
        runs[name] = {"eval_accuracy": summary.get("eval_accuracy"), "final_loss": summary.get("final_loss"),
                      "samples_per_sec": summary.get("samples_per_sec"), "steps": summary.get("steps"),
                      "seconds": round(time.monotonic() - t0, 1)}
    out: dict[str, Any] = {"runs": runs, "loss_gap_target": LOSS_GAP, "accuracy_gap_target": ACCURACY_GAP}
    ok = True
    for name in ("gpu", "gpu_amp"):
        gap = curve_gap(curves[name], curves["cpu"])
        acc, ref = runs[name]["eval_accuracy"], runs["cpu"]["eval_accuracy"]
        acc_gap = None if acc is None or ref is None else abs(acc - ref)
        out[f"{name}_loss_gap"], out[f"{name}_accuracy_gap"] = gap, acc_gap
        ok = ok and gap is not None and gap <= LOSS_GAP and acc_gap is not None and acc_gap <= ACCURACY_GAP
    out["ok"] = ok
    return out


def check_b1(r: Runner, work: Path, quick: bool) -> dict[str, Any]:
    if quick:
        cases = [("small", 128, ["--warmup", "2", "--windows", "2", "--window-seconds", "0.2"])]
    else:
        cases = [("large", 128, ["--windows", "6", "--window-seconds", "1.0"]),
                 ("xlarge", 2048, ["--windows", "6", "--window-seconds", "1.0", "--warmup", "5"])]
    out: dict[str, Any] = {"models": {}, "target": 0.95}
    for model, batch, extra in cases:
        cmd = [sys.executable, str(PEERS / "paired.py"), "--model", model, "--global-batch", str(batch), *extra]
        result = parse_result(r.output_of(cmd, r.env(), f"b1: {model}"))
        if result is None:
            raise RuntimeError(f"b1: {model}: no result line (see runs.log)")
        ours, theirs = result["samples_per_sec"], result["bare_samples_per_sec"]
        out["models"][model] = {"global_batch": batch, "ratio": statistics.median(result["paired_ratios"]),
                                "dtrain_samples_per_sec": statistics.median(ours),
                                "bare_samples_per_sec": statistics.median(theirs), "windows": len(ours)}
    out["ok"] = all(m["ratio"] >= out["target"] for m in out["models"].values())
    return out


def stall_share(records: list[dict[str, Any]]) -> float | None:
    """The data stall share of a run's steady state: the mean of its records after the first (which also
    waits for the cluster's first partitions)."""
    shares = [float(x["data_stall"]) for x in records[1:] if "data_stall" in x]
    return statistics.fmean(shares) if shares else None


def check_stall(r: Runner, work: Path, quick: bool) -> dict[str, Any]:
    rows, hidden, batch = (20000, "64,64", 256) if quick else (1_000_000, "1024,1024", 1024)
    data = work / "stall-data"
    r.run([sys.executable, "-m", "dtrain.datagen", "--out", str(data), "--rows", str(rows), "--partitions", "16",
           "--features", "32"], r.env(gpu=False), "stall: datagen")
    out: dict[str, Any] = {"rows": rows, "hidden": hidden, "global_batch": batch, "target": STALL_TARGET, "runs": {}}
    for name, extra in (("pinned", {}), ("unpinned", {"DTRAIN_PIN_MEMORY": "0"})):
        run_dir = work / f"stall-{name}"
        r.run(dtrain_cmd(["--data", str(data), "--label", "label", "--epochs", "1", "--hidden", hidden,
                          "--global-batch-size", str(batch), "--log-every", "20", "--run-dir", str(run_dir)]),
              r.env(extra), f"stall: {name}")
        summary, records = read_run(run_dir)
        out["runs"][name] = {"data_stall": stall_share(records), "samples_per_sec": summary.get("samples_per_sec"),
                             "steps": summary.get("steps")}
    stall = out["runs"]["pinned"]["data_stall"]
    out["ok"] = stall is not None and stall < STALL_TARGET
    return out


def check_checkpoint(r: Runner, work: Path, quick: bool) -> dict[str, Any]:
    rows, epochs = (6000, 2) if quick else (65536, 3)
    args = ["--gen-rows", str(rows), "--gen-partitions", "8", "--hidden", "512,512", "--dropout", "0.1",
            "--epochs", str(epochs), "--global-batch-size", "64", "--checkpoint-every", "25", "--log-every", "5"]
    ref_dir, run_dir = work / "ckpt-reference", work / "ckpt-killed"
    r.run(dtrain_cmd([*args, "--run-dir", str(ref_dir)]), r.env(), "checkpoint: reference")
    reference, ref_records = read_run(ref_dir)
    kill_after = max(30, int(reference["steps"]) // 3)

    proc = r.start(dtrain_cmd([*args, "--run-dir", str(run_dir)]), r.env())
    killed_at = None
    while killed_at is None:
        if proc.poll() is not None:
            raise RuntimeError(f"checkpoint: the run ended (exit {proc.returncode}) before step {kill_after}")
        if time.monotonic() > r.deadline:
            kill(proc)
            raise CheckTimeout("checkpoint: step to kill at not reached by the check's deadline")
        done = checkpoints(run_dir)
        if done and done[-1] >= kill_after:
            kill(proc)  # the whole job, mid-step: no stop checkpoint, only the periodic ones
            killed_at = done[-1]
        time.sleep(0.02)
    r.run(dtrain_cmd([*args, "--run-dir", str(run_dir)]), r.env(), "checkpoint: rerun")
    resumed, _ = read_run(run_dir)
    seconds = [float(x["checkpoint_seconds"]) for x in ref_records if x.get("checkpoint_seconds")]
    out = {"steps": reference["steps"], "killed_after_checkpoint": killed_at,
           "reference_sha256": reference["model_sha256"], "resumed_sha256": resumed["model_sha256"],
           "same_model": (reference["model_sha256"] == resumed["model_sha256"]
                          and resumed["steps"] == reference["steps"]),
           "checkpoint_seconds_max": max(seconds, default=None)}
    out["ok"] = out["same_model"]
    return out


RUNS: dict[str, Callable[[Runner, Path, bool], dict[str, Any]]] = {
    "amp": check_amp, "b1": check_b1, "stall": check_stall, "checkpoint": check_checkpoint}


def environment(device: str, build: Path | None) -> dict[str, Any]:
    """What the figures were measured on: versions, the GPU, and how Horovod was built there."""
    import torch

    env: dict[str, Any] = {"device": device, "python": platform.python_version(), "torch": torch.__version__,
                           "cuda": torch.version.cuda, "cpus": os.cpu_count()}
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name(0)
    try:
        import horovod.torch as hvd

        env["horovod"] = importlib.metadata.version("horovod")
        env["horovod_nccl_built"] = bool(hvd.nccl_built())
    except Exception as e:  # recorded, not fatal: the checks say what fails without it
        env["horovod"] = f"not importable: {e}"
    if build is not None and build.is_file():
        env["build"] = json.loads(build.read_text())
    return env


def run(ns: argparse.Namespace) -> int:
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    result_path = out / "gpu_check.json"
    results: dict[str, Any] = {"environment": environment(ns.device, Path(ns.build) if ns.build else None),
                               "quick": ns.quick, "checks": {}}
    budget = Budget(ns.seconds, ns.only)
    runner = Runner(out / "runs.log", ns.device)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        for name in ns.only:
            seconds = budget.take(name)
            runner.deadline = time.monotonic() + seconds
            t0 = time.monotonic()
            print(f"[gpu_check] {name}: up to {seconds:.0f} s", flush=True)
            try:
                figures = RUNS[name](runner, Path(tmp), ns.quick)
                figures["error"] = None
            except (CheckTimeout, RuntimeError, OSError, KeyError, ValueError, json.JSONDecodeError) as e:
                figures = {"ok": False, "error": f"{type(e).__name__}: {e}"}
            figures["seconds"] = round(time.monotonic() - t0, 1)
            results["checks"][name] = figures
            # Written after every check, so that a run cut short keeps what it measured.
            result_path.write_text(json.dumps(results, indent=2, default=str) + "\n")
            print(f"[gpu_check] {name}: {'ok' if figures['ok'] else 'NOT ok'} in {figures['seconds']} s"
                  + (f" ({figures['error']})" if figures["error"] else ""), flush=True)
    print(table(results))
    return 0


# ---------------------------------------------------------------------------------------------------
# the table


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.{digits}g}"
    return str(value)


def rows(results: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(check, figure, value) for every figure of the table, in the checks' order."""
    out: list[tuple[str, str, str]] = []
    checks = results.get("checks", {})
    for name in CHECKS:
        c = checks.get(name)
        if c is None:
            continue
        if c.get("error"):
            out.append((name, "error", str(c["error"])))
        if name == "amp" and "runs" in c:
            for run_name, x in c["runs"].items():
                out.append((name, f"{run_name}: eval_accuracy, final loss, samples/s",
                            f"{_fmt(x['eval_accuracy'])}, {_fmt(x['final_loss'])}, {_fmt(x['samples_per_sec'])}"))
            for run_name in ("gpu", "gpu_amp"):
                out.append((name, f"{run_name} vs cpu: loss curve gap, accuracy gap",
                            f"{_fmt(c[f'{run_name}_loss_gap'])} (<= {LOSS_GAP}), "
                            f"{_fmt(c[f'{run_name}_accuracy_gap'])} (<= {ACCURACY_GAP})"))
        if name == "b1" and "models" in c:
            for model, x in c["models"].items():
                out.append((name, f"{model} batch {x['global_batch']}: dtrain / bare (paired), samples/s",
                            f"{_fmt(x['ratio'])} (>= {c['target']}), {_fmt(x['dtrain_samples_per_sec'])} "
                            f"vs {_fmt(x['bare_samples_per_sec'])}"))
        if name == "stall" and "runs" in c:
            for run_name, x in c["runs"].items():
                out.append((name, f"{run_name}: data stall, samples/s",
                            f"{_fmt(x['data_stall'])} (< {c['target']}), {_fmt(x['samples_per_sec'])}"))
        if name == "checkpoint" and "same_model" in c:
            out.append((name, "killed after checkpoint, of steps", f"{c['killed_after_checkpoint']} of {c['steps']}"))
            out.append((name, "same model_sha256 after SIGKILL and rerun", _fmt(c["same_model"])))
            out.append((name, "longest checkpoint (s)", _fmt(c["checkpoint_seconds_max"])))
        out.append((name, "verdict", f"{'ok' if c.get('ok') else 'NOT ok'} ({_fmt(c.get('seconds'))} s)"))
    return out


def table(results: dict[str, Any]) -> str:
    env = results.get("environment", {})
    head = (f"gpu_check on {env.get('gpu') or env.get('device', '?')}: torch {env.get('torch', '?')}, "
            f"horovod {env.get('horovod', '?')} (nccl: {_fmt(env.get('horovod_nccl_built'))})")
    lines = [head, "", "| check | figure | value |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows(results)]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# command line


def _checks(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in CHECKS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"{', '.join(unknown) or 'none given'}: not a check; checks are "
                                         f"{', '.join(CHECKS)}")
    return [c for c in CHECKS if c in names]  # the documented order, whatever the order given


def _seconds(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text}: must be > 0")
    return value


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="gpu_check.py", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="download into --dir what the GPU machine lacks (idempotent)")
    p.add_argument("--dir", default=str(REPO / ".gpu"), help="folder to fill (default: .gpu in the repository)")
    p.add_argument("--dry-run", action="store_true", help="list what would be downloaded or removed, change nothing")
    r = sub.add_parser("run", help="run the checks, JSON into --out, a table on stdout")
    r.add_argument("--out", required=True, help="folder for gpu_check.json and runs.log")
    r.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cuda: the GPU path; cpu: the same code paths on the CPU (CI)")
    r.add_argument("--only", type=_checks, default=list(CHECKS), help=f"comma-separated checks of {', '.join(CHECKS)}")
    r.add_argument("--seconds", type=_seconds, default=300.0, help="time for all the checks together")
    r.add_argument("--quick", action="store_true", help="tiny sizes: seconds per check (CI)")
    r.add_argument("--build", help="JSON that gpu_check.sh wrote about the Horovod build, put into the results")
    t = sub.add_parser("table", help="print the table of a gpu_check.json")
    t.add_argument("json")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    ap = parser()
    ns = ap.parse_args(argv)
    if ns.command == "prepare":
        return prepare(Path(ns.dir), ns.dry_run)
    if ns.command == "table":
        try:
            print(table(json.loads(Path(ns.json).read_text())))
        except (OSError, json.JSONDecodeError) as e:
            ap.error(f"{ns.json}: {e}; give the gpu_check.json a run wrote")
        return 0
    if ns.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            ap.error("--device cuda: no CUDA device visible; run it on the GPU machine, or pass --device cpu")
    return run(ns)


if __name__ == "__main__":
    sys.exit(main())
