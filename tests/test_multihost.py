"""Ranks on several hosts: the test bed's h1 and h2 (launch/testbed.sh), each pinned to its own core.

As on a real cluster, horovodrun runs on h1 and starts the ranks over ssh; the Dask scheduler runs
on h1 (launch/dask_cluster.sh) with a worker on each host; run directories are on the file system
every host shares. Gloo crosses the bed's bridge on each host's ``dt0``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import PYTHON, REPO, metrics_lines, wait_for
from testbed import NIC, VENV_BIN, Testbed, address

from dtrain.checkpoint import Checkpointer

pytestmark = [pytest.mark.multihost, pytest.mark.timeout(420)]

HOROVODRUN = str(VENV_BIN / "horovodrun")
DASK = str(VENV_BIN / "dask")
# Small data whose training split is not a multiple of the global batch: the last batch is partial.
SMALL = ["--gen-rows", "5000", "--gen-partitions", "8", "--gen-features", "16", "--global-batch-size", "96",
         "--hidden", "32,32", "--log-every", "5"]
ENV = {"HOROVOD_GLOO_TIMEOUT_SECONDS": "15", "PYTHONPATH": str(REPO / "tests" / "fixtures")}


def horovodrun(hosts: str, args: Sequence[str], extra: Sequence[str] = ()) -> list[str]:
    np = sum(int(h.split(":")[1]) for h in hosts.split(","))
    nic = NIC if "," in hosts else "lo"  # one host: horovodrun's rendezvous is on 127.0.0.1
    return [HOROVODRUN, "-np", str(np), "-H", hosts, "--gloo", "--network-interfaces", nic, *extra,
            PYTHON, "-m", "dtrain", *args]


def run_job(bed: Testbed, cmd: Sequence[str], log: Path, timeout: float = 300,
            env: dict[str, str] | None = None) -> tuple[int, str]:
    proc = bed.start("h1", cmd, log, env={**ENV, **(env or {})})
    try:
        rc = proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    return rc, log.read_text()


def summary(run: Path) -> dict[str, Any]:
    return json.loads((run / "summary.json").read_text())


def max_rel_diff(a: Path, b: Path) -> float:
    x, y = torch.load(a / "model.pt"), torch.load(b / "model.pt")
    return max(float((x[k] - y[k]).abs().max() / y[k].abs().max().clamp_min(1e-12)) for k in x)


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if "dtrain: error:" in line]


@pytest.fixture(scope="module")
def bed_cluster(testbed_session: Testbed, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Dask scheduler on h1 started by launch/dask_cluster.sh, and one worker on each host."""
    bed = testbed_session
    logs = tmp_path_factory.mktemp("bed-dask")
    out = logs / "dask_cluster.out"
    sched = bed.start("h1", [str(REPO / "launch" / "dask_cluster.sh"), "-n", "1", "--host", address("h1"),
                             "--dashboard-port", "0", "--dir", str(logs)], out, keep=True)
    found = wait_for("the scheduler's address", lambda: re.search(r"^tcp://\S+$", out.read_text(), re.M),
                     sched, timeout=120)
    scheduler = found.group(0)
    worker = bed.start("h2", [DASK, "worker", scheduler, "--nthreads", "1", "--name", "h2-1"], logs / "w2.log",
                       keep=True)
    waited = bed.run("h1", [PYTHON, "-c", "import sys; from distributed import Client; "
                            "Client(sys.argv[1], timeout=30).wait_for_workers(2, timeout=60)", scheduler])
    assert waited.returncode == 0, waited.stderr + (logs / "w2.log").read_text()
    try:
        yield scheduler
    finally:
        for proc in (worker, sched):
            bed.keep.discard(proc.pid)
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except Exception:
                proc.kill()
        bed.clean()


def test_hosts_are_hosts(testbed):
    """Each host has its name, address and core; ssh from one to the other needs nothing more."""
    res = testbed.run("h1", ["ssh", "h2", "hostname; hostname -i; nproc"])
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["h2", address("h2"), "1"]
    res = testbed.run("h1", ["sh", "-c", "hostname; nproc"])
    assert res.stdout.split() == ["h1", "1"]


def test_embedded_cluster_spans_hosts_over_tls(testbed, tmp_path):
    """launch/multihost.sh with no --scheduler on two hosts: the ranks share rank 0's embedded cluster
    over TLS, and a client without the run's certificate cannot use it."""
    run, log = tmp_path / "run", tmp_path / "log.txt"
    pace = tmp_path / "pace"
    pace.touch()
    args = ["--gen-rows", "20000", "--global-batch-size", "64", "--model", "paced_model:factory", "--optimizer",
            "sgd", "--epochs", "1", "--run-dir", str(run)]
    env = {**ENV, "PYTHONPATH": str(REPO / "tests" / "fixtures"), "PACED_MODEL_FILE": str(pace)}
    # As a user starts it: the documented launcher, on h1.
    launcher = [str(REPO / "launch" / "multihost.sh"), "-H", "h1:1,h2:1", "--network-interface", NIC, "--", *args]
    proc = testbed.start("h1", launcher, log, env=env)
    try:
        found = wait_for("the embedded cluster's address",
                         lambda: re.search(r"embedded Dask cluster at (tls://[\d.]+:\d+)", log.read_text()), proc)
        scheduler = found.group(1)
        assert scheduler.startswith(f"tls://{address('h1')}:")
        # From the other host: plain TCP, and TLS with a certificate of its own, are both refused.
        probe = ("import sys; from distributed import Client; from distributed.security import Security\n"
                 "for addr, sec in ((sys.argv[1].replace('tls', 'tcp'), None), (sys.argv[1], Security.temporary())):\n"
                 "    try:\n        Client(addr, timeout=5, security=sec)\n    except Exception:\n"
                 "        print('refused')\n    else:\n        print('connected')\n")
        res = testbed.run("h2", [PYTHON, "-c", probe, scheduler], timeout=120)
        assert res.stdout.split() == ["refused", "refused"], res.stdout + res.stderr
        pace.unlink()
        assert proc.wait(timeout=300) == 0, log.read_text()[-5000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    s = summary(run)
    assert s["world_size"] == 2 and s["ranks_identical"] is True


def test_error_of_another_host_is_printed_once_with_its_name(testbed, tmp_path):
    """Rank 1 alone cannot reach the scheduler (it listens on h1's loopback): its line, with its host."""
    sched = testbed.start("h1", [DASK, "scheduler", "--host", "127.0.0.1", "--port", "8799",
                                 "--dashboard-address", "127.0.0.1:0"], tmp_path / "sched.log")
    wait_for("the scheduler", lambda: "Scheduler at" in (tmp_path / "sched.log").read_text(), sched, timeout=60)
    rc, text = run_job(testbed, horovodrun("h1:1,h2:1", ["--scheduler", "tcp://127.0.0.1:8799", "--connect-timeout",
                                                        "3", *SMALL, "--run-dir", str(tmp_path / "run")]),
                       tmp_path / "log.txt", timeout=200)
    assert rc != 0
    lines = [line for line in error_lines(text) if "--scheduler" in line]
    assert len(lines) == 1, text[-4000:]
    assert lines[0].startswith("[1]<stderr>:dtrain: error: --scheduler: cannot reach the Dask scheduler")
    assert lines[0].endswith("(rank 1 on host h2)")


def test_user_tls_scheduler(testbed, tmp_path):
    """--scheduler tls://... with the user's own certificate: given through Dask's variables it trains,
    without them one line says which variables to set."""
    from distributed.security import Security

    made = Security.temporary()  # a self-signed certificate standing in for the user's own
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text(made.tls_ca_file or "")
    key.write_text(made.tls_scheduler_key or "")
    tls = ["--tls-ca-file", str(cert), "--tls-cert", str(cert), "--tls-key", str(key)]
    sched = testbed.start("h1", [DASK, "scheduler", "--protocol", "tls", "--host", address("h1"), "--port", "8797",
                                 "--dashboard-address", "127.0.0.1:0", *tls], tmp_path / "sched.log")
    wait_for("the scheduler", lambda: "Scheduler at" in (tmp_path / "sched.log").read_text(), sched, timeout=60)
    scheduler = f"tls://{address('h1')}:8797"
    testbed.start("h2", [DASK, "worker", scheduler, "--nthreads", "1", *tls], tmp_path / "worker.log")
    args = ["--scheduler", scheduler, *SMALL, "--max-steps", "20"]
    rc, text = run_job(testbed, horovodrun("h1:1,h2:1", [*args, "--run-dir", str(tmp_path / "bare")]),
                       tmp_path / "bare.txt", timeout=200)
    assert rc != 0, text[-4000:]  # horovodrun exits 1 when a rank exits 2
    lines = error_lines(text)
    assert lines and all("DASK_DISTRIBUTED__COMM__TLS__CA_FILE" in line for line in lines), text[-4000:]
    env = {"DASK_DISTRIBUTED__COMM__TLS__CA_FILE": str(cert), "DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT": str(cert),
           "DASK_DISTRIBUTED__COMM__TLS__CLIENT__KEY": str(key)}
    rc, text = run_job(testbed, horovodrun("h1:1,h2:1", [*args, "--run-dir", str(tmp_path / "run")]),
                       tmp_path / "log.txt", env=env)
    assert rc == 0, text[-5000:]
    assert summary(tmp_path / "run")["steps"] == 20


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_four_ranks_on_two_hosts_follow_one_process(testbed, bed_cluster, dtrain_local, tmp_path, optimizer):
    """np=4 on 2 hosts ends where one process with the same global batch ends; every rank alike. The
    gradients take the hierarchical allreduce (dtrain/hier.py), and each host's ranks share one copy of
    the parameters, stepped by shards.

    A short horizon: across hosts the gradients are summed in another order than one process sums
    them; Adam's normalisation amplifies such 1e-7 differences in near-zero gradients (a 4-rank run on
    ONE host with DTRAIN_ALLREDUCE=horovod ends exactly where this one does, and 1e-2 from one process
    after 94 steps), so the comparison stops at step 20."""
    args = [*SMALL, "--epochs", "1", "--max-steps", "20", "--optimizer", optimizer,
            "--lr", "0.05" if optimizer == "sgd" else "0.003", "--weight-decay", "0.01"]
    four, _ = four_ranks_follow_one_process(testbed, bed_cluster, dtrain_local, tmp_path, "h1:2,h2:2", args)
    assert four["sharded_step"] is True


def four_ranks_follow_one_process(bed: Testbed, scheduler: str, dtrain_local: Any, tmp_path: Path, hosts: str,
                                  args: list[str]) -> tuple[dict[str, Any], str]:
    """4 ranks on ``hosts`` summing hierarchically end within 1e-5 of one process, every rank alike;
    their summary and output."""
    one = dtrain_local(args, run_dir=tmp_path / "one").check()
    rc, text = run_job(bed, horovodrun(hosts, ["--scheduler", scheduler, *args, "--run-dir", str(tmp_path / "four")]),
                       tmp_path / "log.txt")
    assert rc == 0, text[-5000:]
    four = summary(tmp_path / "four")
    assert four["world_size"] == 4 and four["steps"] == one.summary()["steps"] > 0
    assert four["ranks_identical"] is True  # every rank's model_sha256 equal
    assert "(hierarchical)" in text, text[-5000:]
    assert max_rel_diff(tmp_path / "four", tmp_path / "one") < 1e-5
    return four, text


def test_three_hosts_with_unequal_ranks_follow_one_process(testbed, bed_cluster, dtrain_local, tmp_path):
    """2, 1 and 1 ranks on h1, h2 and h3: the hosts cut different shards, so the hierarchical sum goes by
    atoms (dtrain/hier.py), and every rank takes the whole step (shards cut differently would round
    differently). The same model as one process, on every rank alike."""
    args = [*SMALL, "--epochs", "1", "--max-steps", "20", "--optimizer", "sgd", "--lr", "0.05", "--grad-clip", "0.5"]
    four, text = four_ranks_follow_one_process(testbed, bed_cluster, dtrain_local, tmp_path, "h1:2,h2:1,h3:1", args)
    assert four["sharded_step"] is False and "whole optimizer step: hosts with unequal numbers of ranks" in text


def test_host_lost_mid_step_with_the_hierarchical_sum(testbed, bed_cluster, tmp_path):
    """h2 (2 of 4 ranks) lost mid-run, its link cut before its processes die (a host that goes silent,
    no FIN): h1's ranks, waiting in the sum across hosts, end within seconds (their watch reads h2's
    stilled heartbeats), each with one line naming h2; the last checkpoint stays intact and the same
    command resumes from it once h2 is back."""
    run, log, pace = tmp_path / "run", tmp_path / "log.txt", tmp_path / "pace"
    cmd = horovodrun("h1:2,h2:2", ["--scheduler", bed_cluster, *FAULT_TRAIN, "--run-dir", str(run)])

    def lose() -> None:
        testbed.link("h2", False)
        testbed.kill_host("h2")

    text = lost_mid_run(testbed, cmd, run, log, pace, {**ENV, "PACED_MODEL_FILE": str(pace)}, lose)
    assert "(hierarchical)" in text
    errors = error_lines(text)
    assert 1 <= len(errors) <= 2 and len({e.split("]")[0] for e in errors}) == len(errors), text[-5000:]
    for line in errors:
        assert "stopped because another rank failed" in line and "on h2 stopped answering" in line, line
        assert "on h1" not in line and "once h2 is back" in line, line
    resumes(testbed, cmd, run, log, pace)


def lost_mid_run(bed: Testbed, cmd: Sequence[str], run: Path, log: Path, pace: Path, env: dict[str, str],
                 lose: Any) -> str:
    """Start ``cmd`` on h1 (slowed by ``pace``), call ``lose()`` once a checkpoint exists: the job ends
    within a bound, with nothing finished and the checkpoint intact. Returns its output."""
    pace.touch()
    proc = bed.start("h1", cmd, log, env=env)
    try:
        wait_for("a checkpoint", lambda: Checkpointer(str(run / "checkpoints")).list(), proc, timeout=300)
        lose()
        cut = time.monotonic()
        rc = proc.wait(timeout=180)
        print(f"the job ended {time.monotonic() - cut:.0f} s after h2 was lost")
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rc != 0 and not (run / "summary.json").exists()
    assert Checkpointer(str(run / "checkpoints")).latest() is not None
    return log.read_text()


def resumes(bed: Testbed, cmd: Sequence[str], run: Path, log: Path, pace: Path) -> None:
    """With every host back, the same command resumes from the checkpoint and finishes."""
    bed.clean()
    pace.unlink()
    rc, text = run_job(bed, cmd, log)
    assert rc == 0, text[-5000:]
    assert "resuming from" in text and summary(run)["steps"] == 120


def kill_job(bed: Testbed) -> None:
    """SIGKILL every process of the job on every host at once (not the Dask cluster, not sshd)."""
    kept = bed.kept()
    victims = [p for h in bed.hosts for p in bed.pids(h) if p not in kept and p != bed.sshd(h)]
    for pid in victims:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def test_whole_job_sigkilled_then_rerun_ends_with_same_model(testbed, bed_cluster, tmp_path):
    args = ["--scheduler", bed_cluster, "--gen-rows", "12000", "--gen-partitions", "8", "--global-batch-size", "64",
            "--hidden", "32", "--dropout", "0.1", "--epochs", "2", "--checkpoint-every", "40", "--log-every", "10"]
    ref = tmp_path / "ref"
    rc, text = run_job(testbed, horovodrun("h1:2,h2:2", [*args, "--run-dir", str(ref)]), tmp_path / "ref.txt")
    assert rc == 0, text[-5000:]
    run, log = tmp_path / "run", tmp_path / "log.txt"
    proc = testbed.start("h1", horovodrun("h1:2,h2:2", [*args, "--run-dir", str(run)]), log, env=ENV)
    wait_for("step 100 and a checkpoint", lambda: [m for m in metrics_lines(run) if m["step"] >= 100]
             and Checkpointer(str(run / "checkpoints")).list(), proc, timeout=300)
    kill_job(testbed)
    proc.wait(timeout=30)
    assert not (run / "summary.json").exists()
    rc, text = run_job(testbed, horovodrun("h1:2,h2:2", [*args, "--run-dir", str(run)]), log)
    assert rc == 0, text[-5000:]
    assert "resuming from" in text
    assert summary(run)["model_sha256"] == summary(ref)["model_sha256"]


def test_dask_worker_host_lost_mid_epoch(testbed, tmp_path):
    """h2, which holds a Dask worker and no rank, is lost mid-epoch: the ranks on h1 train on from the
    worker left (lost partitions recomputed from storage), every row once per epoch."""
    scheduler = own_cluster(testbed, tmp_path, 8796, ["h1", "h2"])
    pace = tmp_path / "pace"
    pace.touch()
    run, audit, log = tmp_path / "run", tmp_path / "audit", tmp_path / "log.txt"
    args = ["--scheduler", scheduler, "--gen-rows", "20000", "--gen-partitions", "16", "--global-batch-size", "64",
            "--model", "paced_model:factory", "--optimizer", "sgd", "--epochs", "2", "--log-every", "5",
            "--audit-dir", str(audit), "--run-dir", str(run)]
    env = {**ENV, "PYTHONPATH": str(REPO / "tests" / "fixtures"), "PACED_MODEL_FILE": str(pace),
           "PACED_MODEL_SECONDS": "0.02"}
    proc = testbed.start("h1", horovodrun("h1:2", args), log, env=env)
    try:
        wait_for("step 30", lambda: [m for m in metrics_lines(run) if m["step"] >= 30], proc, timeout=300)
        testbed.kill_host("h2")
        testbed.link("h2", False)
        seen = len(metrics_lines(run))
        wait_for("training on without h2", lambda: len(metrics_lines(run)) > seen + 3, proc, timeout=120)
        pace.unlink()
        assert proc.wait(timeout=300) == 0, log.read_text()[-5000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    stats = json.loads((run / "stats.json").read_text())
    train_rows = sum(stats["train_sizes"])
    records = [json.loads(line) for f in audit.glob("*.jsonl") for line in f.read_text().splitlines()]
    for epoch in (0, 1):
        rows = Counter(row for rec in records if rec["epoch"] == epoch for row in rec["rows"])
        assert sum(rows.values()) == train_rows and set(rows.values()) == {1}


def own_cluster(bed: Testbed, logs: Path, port: int, workers: Sequence[str]) -> str:
    """A scheduler on h1 and a worker on each of ``workers``, for a test that breaks some of them."""
    sched = bed.start("h1", [DASK, "scheduler", "--host", address("h1"), "--port", str(port),
                             "--dashboard-address", "127.0.0.1:0"], logs / "sched.log")
    wait_for("the scheduler", lambda: "Scheduler at" in (logs / "sched.log").read_text(), sched, timeout=60)
    scheduler = f"tcp://{address('h1')}:{port}"
    for host in workers:
        bed.start(host, [DASK, "worker", scheduler, "--nthreads", "1", "--name", host], logs / f"w-{host}.log")
    return scheduler


ELASTIC_TRAIN = ["--gen-rows", "20000", "--global-batch-size", "64", "--epochs", "2", "--optimizer", "sgd",
                 "--momentum", "0", "--lr", "0.05", "--model", "paced_model:factory", "--log-every", "10",
                 "--commit-every", "20"]


def run_elastic(bed: Testbed, tmp_path: Path, disrupt: Any) -> tuple[Path, Path]:
    """An elastic job of up to 2 x 2 ranks from h1 whose hosts come from a hosts file; ``disrupt``
    changes the world while the training is slowed down (tests/fixtures/paced_model.py)."""
    from test_elastic import DISCOVER

    scheduler = own_cluster(bed, tmp_path, 8795, ["h1"])  # the cluster outlives any rank, on h1
    hosts, run, audit, log, pace = (tmp_path / n for n in ("hosts", "run", "audit", "log.txt", "pace"))
    hosts.write_text("h1:2\nh2:2\n")
    pace.touch()
    cmd = [HOROVODRUN, "-np", "4", "--min-np", "2", "--max-np", "4", "--host-discovery-script", DISCOVER,
           "--network-interfaces", NIC, "--gloo-timeout-seconds", "10", "--blacklist-cooldown-range", "2", "4",
           PYTHON, "-m", "dtrain", "--scheduler", scheduler, "--run-dir", str(run), "--audit-dir", str(audit),
           *ELASTIC_TRAIN]
    env = {**ENV, "DTRAIN_HOSTS_FILE": str(hosts), "PYTHONPATH": str(REPO / "tests" / "fixtures"),
           "PACED_MODEL_FILE": str(pace), "PACED_MODEL_SECONDS": "0.03"}
    proc = bed.start("h1", cmd, log, env=env)
    try:
        disrupt(proc, run, hosts)
        pace.unlink()
        assert proc.wait(timeout=300) == 0, log.read_text()[-6000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    # The world changes under fixed groups: Horovod sums the gradients, and the log's start says why.
    assert "gradients over Horovod (not through shared memory, nor hierarchically across hosts: an elastic run" \
        in log.read_text()
    return run, audit


def until_world(run: Path, size: int, after: int) -> Any:
    return lambda: next((m for m in metrics_lines(run)[after:] if m["world_size"] == size), None)


def test_elastic_host_lost_then_back(testbed, tmp_path):
    """h2 is lost (its processes SIGKILLed, its link down): training goes on with h1's 2 ranks; h2
    comes back and the job grows to 4 again. Every row once per epoch beyond the rollback."""
    from test_elastic import check_audit

    def disrupt(proc: Any, run: Path, hosts: Path) -> None:
        wait_for("step 40 on 4 ranks", lambda: [m for m in metrics_lines(run) if m["step"] >= 40
                                                and m["world_size"] == 4], proc, timeout=300)
        seen = len(metrics_lines(run))
        testbed.kill_host("h2")
        testbed.link("h2", False)
        wait_for("training on 2 ranks", until_world(run, 2, seen), proc, timeout=120)
        seen = len(metrics_lines(run))
        testbed.link("h2", True)
        testbed.start_host("h2")
        wait_for("h2 back: 4 ranks", until_world(run, 4, seen), proc, timeout=180)

    run, audit = run_elastic(testbed, tmp_path, disrupt)
    sizes = [m["world_size"] for m in metrics_lines(run)]
    assert sizes[0] == 4 and 2 in sizes and sizes[-1] == 4
    assert check_audit(audit, run) <= 20  # at most the steps since the last commit, trained again


def test_elastic_host_removed_gracefully_then_back(testbed, tmp_path):
    from test_elastic import check_audit

    def disrupt(proc: Any, run: Path, hosts: Path) -> None:
        wait_for("step 40 on 4 ranks", lambda: [m for m in metrics_lines(run) if m["step"] >= 40
                                                and m["world_size"] == 4], proc, timeout=300)
        seen = len(metrics_lines(run))
        hosts.write_text("h1:2\n")
        wait_for("training on 2 ranks", until_world(run, 2, seen), proc, timeout=120)
        seen = len(metrics_lines(run))
        hosts.write_text("h1:2\nh2:2\n")
        wait_for("h2 back: 4 ranks", until_world(run, 4, seen), proc, timeout=180)

    run, audit = run_elastic(testbed, tmp_path, disrupt)
    sizes = [m["world_size"] for m in metrics_lines(run)]
    assert sizes[0] == 4 and 2 in sizes and sizes[-1] == 4
    assert check_audit(audit, run) == 0  # graceful changes take effect at commits: nothing retrained


FAULT_TRAIN = ["--gen-rows", "20000", "--gen-partitions", "8", "--global-batch-size", "64", "--hidden", "32",
               "--model", "paced_model:factory", "--epochs", "1", "--max-steps", "120", "--checkpoint-every", "20",
               "--log-every", "10"]


def test_slow_lossy_link_same_model(testbed, bed_cluster, tmp_path):
    """h2's link limited to 20 Mbit/s and dropping 1% of packets each way: the same model as on a clean
    link (TCP retransmits; nothing above it sees the loss)."""
    args = ["--scheduler", bed_cluster, *FAULT_TRAIN]
    rc, text = run_job(testbed, horovodrun("h1:1,h2:1", [*args, "--run-dir", str(tmp_path / "clean")]),
                       tmp_path / "clean.txt")
    assert rc == 0, text[-5000:]
    testbed.shape("h2", "20mbit")
    testbed.loss("h2", 1)
    rc, text = run_job(testbed, horovodrun("h1:1,h2:1", [*args, "--run-dir", str(tmp_path / "faulty")]),
                       tmp_path / "faulty.txt")
    assert rc == 0, text[-5000:]
    assert summary(tmp_path / "faulty")["model_sha256"] == summary(tmp_path / "clean")["model_sha256"]


def test_partition_longer_than_gloo_timeout(testbed, bed_cluster, tmp_path):
    """h2's link down for longer than the Gloo timeout (10 s here): the job ends within a bound, the
    last checkpoint intact; with the link back the rerun resumes from it and finishes."""
    run, log, pace = tmp_path / "run", tmp_path / "log.txt", tmp_path / "pace"
    cmd = horovodrun("h1:1,h2:1", ["--scheduler", bed_cluster, *FAULT_TRAIN, "--run-dir", str(run)])
    env = {**ENV, "HOROVOD_GLOO_TIMEOUT_SECONDS": "10", "PACED_MODEL_FILE": str(pace)}
    text = lost_mid_run(testbed, cmd, run, log, pace, env, lambda: testbed.link("h2", False))
    # One line from the survivor, naming h2: its rank's heartbeat stood still (dtrain/supervise.py).
    errors = error_lines(text)
    assert len(errors) == 1 and "stopped because another rank failed" in errors[0], text[-5000:]
    assert "rank 1 on h2 stopped answering" in errors[0] and "once h2 is back" in errors[0], errors[0]
    resumes(testbed, cmd, run, log, pace)
