"""Cluster faults in real runs (issue 23): what the user sees when data, workers or ranks fail."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import HOROVODRUN, PYTHON, metrics_lines, start_job, wait_for
from test_storage_faults import problems

from dtrain.checkpoint import Checkpointer

pytestmark = pytest.mark.cluster


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _good_files(where: Path, files: int = 3, rows: int = 400) -> None:
    rng = np.random.default_rng(0)
    where.mkdir()
    for i in range(files):
        df = pd.DataFrame({f"f{j}": rng.normal(size=rows).astype("float32") for j in range(4)})
        df["label"] = rng.integers(0, 3, rows)
        df.to_parquet(where / f"part-{i}.parquet")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("fault", ["missing-column", "text-value"])
def test_a_bad_file_among_good_ones_is_one_line_without_worker_logs(dtrain_local, tmp_path, fault):
    data = tmp_path / "data"
    _good_files(data)
    bad = pd.read_parquet(data / "part-0.parquet")
    if fault == "missing-column":
        bad = bad.drop(columns=["f1"])
    else:
        bad["f1"] = bad["f1"].astype(str)
        bad.loc[3, "f1"] = "oops"
    bad.to_parquet(data / "part-9.parquet")
    res = dtrain_local(["--data", str(data), "--epochs", "1"])
    assert res.returncode == 2, res.output[-3000:]
    lines = problems(res.output)
    assert len(lines) == 1 and "Compute Failed" not in res.output, res.output[-3000:]
    assert lines[0].startswith("dtrain: error: --"), lines
    assert ("has no column 'f1'" if fault == "missing-column" else "'oops'") in lines[0]


@pytest.mark.timeout(180)
def test_a_sigkilled_worker_costs_a_pause_and_every_row_still_comes_once():
    """The only worker of a cluster SIGKILLed mid-epoch: its nanny restarts it, and the tasks that were
    homed on it run there (before dtrain.clusterplugins, they waited as no-worker for good)."""
    import os
    import signal

    from distributed import Client, LocalCluster

    from dtrain.clusterplugins import install
    from dtrain.config import DataConfig
    from dtrain.data import open_dataset
    from dtrain.data.plan import EpochPlan
    from dtrain.data.stream import Stream

    with LocalCluster(n_workers=1, threads_per_worker=2, processes=True, dashboard_address=":0",
                      host="127.0.0.1") as cluster, Client(cluster) as client:
        install(client)
        ds = open_dataset(DataConfig(gen_rows=60_000, gen_partitions=8), 0)
        stats = ds.compute_stats()
        ds.use_stats(stats)
        stream = Stream(client, ds.partitions("train"), len(stats.features), 0, 1, prefetch=16)
        plan = EpochPlan(tuple(stats.train_sizes), 256)
        rows = []
        for i, batch in enumerate(stream.batches(plan)):
            if i == 20:
                (worker,) = cluster.workers.values()
                os.kill(worker.process.process.pid, signal.SIGKILL)
            rows.append(batch.row_id)
        got = np.concatenate(rows)
        assert len(got) == stats.train_rows and len(np.unique(got)) == stats.train_rows


def _dask(args: list[str], log) -> subprocess.Popen[bytes]:
    return subprocess.Popen([str(Path(PYTHON).parent / "dask"), *args], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def _cluster(port: int, log_path: Path) -> list[subprocess.Popen[bytes]]:
    """A Dask scheduler on ``port`` of this host and one worker."""
    log = open(log_path, "ab")  # noqa: SIM115
    procs = [_dask(["scheduler", "--host", "127.0.0.1", "--port", str(port), "--dashboard-address", ":0"], log)]
    procs.append(_dask(["worker", f"tcp://127.0.0.1:{port}", "--nthreads", "2", "--no-dashboard"], log))
    return procs


def _kill(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        p.kill()
        p.wait()


@pytest.mark.timeout(120)
def test_a_stream_carries_on_with_every_row_once_when_its_scheduler_comes_back(tmp_path):
    """Below the trainer, one rank: the cluster killed mid-pass and started again within Dask's own
    reconnection window, so the same client carries on. The pass submits again what it had in flight
    and yields the rows of a pass left alone, in the same order."""
    from distributed import Client

    from dtrain.cluster import reconnect
    from dtrain.clusterplugins import install
    from dtrain.config import DataConfig
    from dtrain.data import open_dataset
    from dtrain.data.plan import EpochPlan
    from dtrain.data.stream import Stream

    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    procs = _cluster(port, tmp_path / "dask.log")
    try:
        with Client(address, timeout=20) as client:
            install(client)
            ds = open_dataset(DataConfig(gen_rows=20_000, gen_partitions=8), 0)
            stats = ds.compute_stats()
            ds.use_stats(stats)
            plan = EpochPlan(tuple(stats.train_sizes), 64, seed=0)

            def stream() -> Stream:
                return Stream(client, ds.partitions("train"), len(stats.features), 0, 1, prefetch=8)

            alone = np.concatenate([b.row_id for b in stream().batches(plan)])
            lost_at, resubmitted, rows = [], 0, []
            s = stream()
            for i, batch in enumerate(s.batches(plan)):
                rows.append(batch.row_id)
                if i == 20:
                    _kill(procs)
                    procs = _cluster(port, tmp_path / "dask.log")
                if s.lost:
                    lost_at.append(i)
                    again, ready = reconnect(client, address, time.monotonic() + 30)
                    assert ready and again is client
                    resubmitted = s.resume(client)
        assert len(lost_at) == 1 and lost_at[0] >= 20 and resubmitted > 0
        assert np.array_equal(np.concatenate(rows), alone)
    finally:
        _kill(procs)


def _rank_problems(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("[") and problems(line)]


_WAITING = re.compile(r"WARNING dtrain\.train\.trainer: lost the Dask scheduler at (\S+); waiting up to (\S+)s for it "
                      r"to come back$")


@pytest.mark.distributed
@pytest.mark.timeout(400)
def test_losing_the_scheduler_stops_every_rank_at_one_step_with_a_checkpoint(tmp_path):
    """Not back within --scheduler-wait: every rank stops after one step, with a checkpoint and one line."""
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    run = tmp_path / "run"
    cmd = [HOROVODRUN, "-np", "2", "-H", "localhost:2", "--gloo", PYTHON, "-m", "dtrain", "--scheduler", address,
           "--gen-rows", "40000", "--gen-partitions", "8", "--global-batch-size", "64", "--epochs", "2",
           "--prefetch", "4", "--log-every", "10", "--scheduler-wait", "3", "--run-dir", str(run)]

    def cluster() -> list[subprocess.Popen[bytes]]:
        return _cluster(port, tmp_path / "dask.log")

    procs = cluster()
    try:
        job = start_job(cmd, tmp_path / "job.log")
        wait_for("step 50", lambda: any(m["step"] >= 50 for m in metrics_lines(run)), job, timeout=240)
        _kill(procs)  # the whole cluster goes: the scheduler and its worker
        assert job.wait(timeout=120) != 0
        output = (tmp_path / "job.log").read_text()
        # The wait, said once (rank 0), then the one error line.
        waiting, *lines = _rank_problems(output)
        assert len(lines) == 1, output[-5000:]
        assert (w := _WAITING.search(waiting)) and w.groups() == (address, "3"), waiting
        m = re.search(r"dtrain: error: lost the Dask scheduler at (\S+); checkpoint saved at step (\d+); "
                      r"rerun the same command once the cluster is back$", lines[0])
        assert m and m.group(1) == address, lines
        step = int(m.group(2))
        found = Checkpointer(str(run / "checkpoints")).latest()
        assert found is not None and found[1]["global_step"] == step >= 50
        # The cluster back on the same address: the same command resumes from that step and finishes.
        procs = cluster()
        again = start_job(cmd, tmp_path / "again.log")
        assert again.wait(timeout=300) == 0, (tmp_path / "again.log").read_text()[-5000:]
        assert f"(step {step})" in (tmp_path / "again.log").read_text()
    finally:
        for p in procs:
            p.kill()


@pytest.mark.distributed
@pytest.mark.timeout(240)
def test_a_scheduler_back_within_the_wait_costs_a_pause_and_not_a_step(tmp_path):
    """The scheduler and its worker killed mid-epoch, then started again on the same port: the ranks wait,
    submit their requests again and train every step, to the very model of a run left alone."""
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"

    def cmd(run: Path) -> list[str]:
        # --connect-timeout 1: Dask's client gives up reconnecting before the cluster is back, so the
        # ranks' own reconnection (a new client) is what carries on.
        return [HOROVODRUN, "-np", "2", "-H", "localhost:2", "--gloo", PYTHON, "-m", "dtrain", "--scheduler", address,
                "--gen-rows", "20000", "--gen-partitions", "8", "--global-batch-size", "64", "--epochs", "2",
                "--prefetch", "4", "--log-every", "10", "--scheduler-wait", "30", "--connect-timeout", "1",
                "--run-dir", str(run)]

    procs = _cluster(port, tmp_path / "dask.log")
    try:
        alone = start_job(cmd(tmp_path / "alone"), tmp_path / "alone.log")
        assert alone.wait(timeout=120) == 0, (tmp_path / "alone.log").read_text()[-5000:]
        run = tmp_path / "run"
        job = start_job(cmd(run), tmp_path / "job.log")
        wait_for("step 50", lambda: any(m["step"] >= 50 for m in metrics_lines(run)), job, timeout=120)
        _kill(procs)
        time.sleep(2)  # past --connect-timeout
        procs = _cluster(port, tmp_path / "dask.log")
        assert job.wait(timeout=120) == 0, (tmp_path / "job.log").read_text()[-5000:]
    finally:
        _kill(procs)
    output = (tmp_path / "job.log").read_text()
    waiting, back = _rank_problems(output)
    assert (w := _WAITING.search(waiting)) and w.groups() == (address, "30"), waiting
    m = re.search(r"WARNING dtrain\.train\.trainer: the Dask scheduler is back; resubmitted (\d+) requests, "
                  r"carrying on from step (\d+)$", back)
    assert m and int(m.group(2)) >= 50, back
    expected = json.loads((tmp_path / "alone" / "summary.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == expected["steps"]
    assert summary["model_sha256"] == expected["model_sha256"]
