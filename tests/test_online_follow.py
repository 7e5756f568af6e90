"""Online mode following a directory (--follow): files land while the job runs, under real horovodrun.

Files are written as writers should: under a name starting with ``_`` (ignored by dtrain), then renamed.
The jobs use the session's Dask cluster (``--scheduler``), so only the ranks start per run.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from conftest import HOROVODRUN, PYTHON, metrics_lines, start_job, wait_for

from dtrain.checkpoint import Checkpointer
from dtrain.data import is_validation

FEATURES = 8
ARGS = ["--mode", "online", "--follow", "--label", "y", "--model", "logistic", "--optimizer", "sgd",
        "--momentum", "0", "--lr", "0.5", "--global-batch-size", "8", "--val-fraction", "0.1",
        "--poll-interval", "0.3", "--log-every", "20"]


def land(directory: Path, name: str, rows: int, seed: int, drop: str | None = None) -> None:
    """Write a file of linearly separable rows (the same hyperplane for every file) atomically."""
    rng = np.random.default_rng(seed)
    w = np.random.default_rng(1234).normal(size=FEATURES)
    x = rng.normal(size=(rows, FEATURES)).astype(np.float32)
    df = pd.DataFrame(x, columns=[f"x{i}" for i in range(FEATURES)])
    df["y"] = (x @ w > 0).astype(np.int64)
    if drop:
        df = df.drop(columns=[drop])
    tmp = directory / f"_tmp-{name}"
    df.to_parquet(tmp)
    os.replace(tmp, directory / name)


def train_ids(first: int, rows: int) -> list[int]:
    """Row ids of the training split of a file whose rows dtrain numbers from ``first`` (seed 0)."""
    ids = np.arange(first, first + rows, dtype=np.int64)
    return ids[~is_validation(ids, 0.1, 0)].tolist()


def audited(audit: Path) -> collections.Counter[int]:
    rows: collections.Counter[int] = collections.Counter()
    for f in audit.glob("*.jsonl"):
        for line in f.read_text().splitlines():
            rows.update(json.loads(line)["rows"])
    return rows


def follow_command(scheduler: str, data: Path, run: Path, audit: Path, *extra: str, np_: int = 2) -> list[str]:
    dtrain = [PYTHON, "-m", "dtrain", "--scheduler", scheduler, "--data", str(data), "--run-dir", str(run),
              "--audit-dir", str(audit), *ARGS, *extra]
    return [HOROVODRUN, "-np", str(np_), "-H", f"localhost:{np_}", "--gloo", *dtrain] if np_ > 1 else dtrain


def waits(log: Path, times: int) -> Any:
    """A check: rank 0 has logged ``times`` times that it waits for new files."""
    return lambda: log.exists() and log.read_text().count("waiting for new files") >= times


def finish(proc: subprocess.Popen[bytes], log: Path, timeout: float = 240) -> int:
    try:
        return proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            print(log.read_text()[-4000:])


@pytest.mark.distributed
@pytest.mark.timeout(420)
def test_follow_trains_every_new_file_once_then_stops_when_idle(dask_client, tmp_path):
    data, run, audit, log = tmp_path / "data", tmp_path / "run", tmp_path / "audit", tmp_path / "log.txt"
    data.mkdir()
    land(data, "part-0.parquet", 3000, seed=0)
    (data / "_SUCCESS").write_text("")  # bookkeeping files are ignored
    cmd = follow_command(dask_client.scheduler.address, data, run, audit, "--idle-timeout", "12")
    proc = start_job(cmd, log)
    wait_for("the first file trained", waits(log, 1), proc, timeout=240)
    land(data, "part-1.parquet", 1000, seed=1)
    wait_for("the second file trained", waits(log, 2), proc)
    land(data, "part-2.parquet", 1000, seed=2)
    assert finish(proc, log) == 0, log.read_text()[-5000:]

    summary = json.loads((run / "summary.json").read_text())
    assert summary["stop_reason"] == "idle_timeout"
    assert summary["files_consumed"] == 3 and summary["epochs"] == 1
    assert summary["progressive_accuracy"] >= 0.95
    assert summary["ranks_identical"]
    expected = train_ids(0, 3000) + train_ids(3000, 1000) + train_ids(4000, 1000)
    rows = audited(audit)
    assert set(rows.values()) == {1}, "a row trained twice"
    assert sorted(rows) == sorted(expected)
    assert summary["samples"] == len(expected)
    lines = metrics_lines(run)
    assert [m["files"] for m in lines][-1] == 3 and all("progressive_accuracy" in m for m in lines)
    assert max(m["epoch"] for m in lines) == 2  # three segments: the first file, then one per poll


@pytest.mark.distributed
@pytest.mark.timeout(480)
def test_sigterm_while_waiting_then_rerun_resumes_up_to_max_samples(dask_client, tmp_path):
    data, run, audit, log = tmp_path / "data", tmp_path / "run", tmp_path / "audit", tmp_path / "log.txt"
    data.mkdir()
    land(data, "a.parquet", 800, seed=0)
    first, second = train_ids(0, 800), train_ids(800, 600)
    limit = len(first) + len(second) - 5  # not a multiple of the batch: the last batch is cut
    cmd = follow_command(dask_client.scheduler.address, data, run, audit, "--max-samples", str(limit))

    proc = start_job(cmd, log)
    wait_for("idle, waiting for files", waits(log, 1), proc, timeout=240)
    proc.send_signal(signal.SIGTERM)  # horovodrun forwards it to the ranks, asleep between polls
    proc.wait(timeout=60)
    text = log.read_text()
    assert "Exit code: 143" in text or "exit with status code 143" in text, text[-3000:]
    saved = Checkpointer(str(run / "checkpoints")).latest()
    assert saved is not None
    assert saved[1]["samples"] == len(first) and saved[1]["position"] == {"epoch": 1, "step": 0, "row": 0}
    assert sorted(audited(audit)) == sorted(first)

    land(data, "b.parquet", 600, seed=1)
    proc = start_job(cmd, log)  # the same command
    assert finish(proc, log) == 0, log.read_text()[-5000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stop_reason"] == "max_samples"
    assert summary["samples"] == limit
    rows = audited(audit)
    assert set(rows.values()) == {1}, "a row trained twice across the two runs"
    assert sorted(rows) == sorted(first + second[: limit - len(first)])  # exactly the first rows, in order
    assert summary["files_consumed"] == 1  # the second file's last rows are left


@pytest.mark.cluster
@pytest.mark.timeout(240)
def test_a_new_file_without_a_feature_column_is_one_line_exit_2(dask_client, tmp_path):
    data, run, log = tmp_path / "data", tmp_path / "run", tmp_path / "log.txt"
    data.mkdir()
    land(data, "a.parquet", 300, seed=0)
    proc = start_job(follow_command(dask_client.scheduler.address, data, run, tmp_path / "audit", np_=1), log)
    wait_for("idle, waiting for files", waits(log, 1), proc, timeout=200)
    land(data, "b.parquet", 100, seed=1, drop="x3")
    assert finish(proc, log) == 2
    text = log.read_text()
    errors = [line for line in text.splitlines() if line.startswith("dtrain: error:")]
    assert len(errors) == 1 and "Traceback" not in text, text[-3000:]
    assert "b.parquet" in errors[0] and "'x3'" in errors[0] and errors[0].startswith("dtrain: error: --follow:")
    assert Checkpointer(str(run / "checkpoints")).latest() is not None  # the rerun, once fixed, resumes


@pytest.mark.unit
@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("extra", "flag"),
    [([], "--follow: needs --mode online"), (["--mode", "online"], "is not a directory or a glob")],
)
def test_follow_needs_online_mode_and_a_directory(dtrain_local, tmp_path, extra, flag):
    data = tmp_path / "data"
    data.mkdir()
    land(data, "a.parquet", 50, seed=0)
    res = dtrain_local(["--follow", "--data", str(data / "a.parquet"), "--label", "y", *extra])
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and flag in res.stderr, res.stderr


@pytest.mark.cluster
@pytest.mark.timeout(240)
def test_max_samples_without_follow_stops_inside_the_second_epoch(dask_client, dtrain_local, tmp_path):
    audit = tmp_path / "audit"
    res = dtrain_local(["--scheduler", dask_client.scheduler.address, "--gen-rows", "1000", "--gen-partitions", "4",
                        "--global-batch-size", "64", "--epochs", "3", "--max-samples", "1500",
                        "--hidden", "8", "--audit-dir", str(audit)]).check()
    summary = res.summary()
    train_rows = sum(json.loads((res.run_dir / "stats.json").read_text())["train_sizes"])
    assert summary["samples"] == 1500 and summary["stop_reason"] == "max_samples"
    assert summary["steps"] == -(-train_rows // 64) + -(-(1500 - train_rows) // 64)
    per_epoch: collections.Counter[int] = collections.Counter()
    for line in (audit / "rank-0.jsonl").read_text().splitlines():
        rec = json.loads(line)
        per_epoch[rec["epoch"]] += len(rec["rows"])
    assert per_epoch == {0: train_rows, 1: 1500 - train_rows}
