"""Guarantees 3 and 5: exact resume after SIGKILL or SIGTERM, and checkpoints that survive a crash."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import HOROVODRUN, PYTHON, REPO, kill_tree, metrics_lines, start_job, wait_for

from dtrain.checkpoint import Checkpointer

# ~1100 steps at batch 64 over 2 epochs: long enough to interrupt, short enough for CI. Dropout: the
# resumed run must draw the same masks at the same steps (seeded per (seed, step, rank), no RNG state).
ARGS = ["--gen-rows", "40000", "--gen-partitions", "8", "--global-batch-size", "64", "--hidden", "64,64",
        "--dropout", "0.1", "--epochs", "2", "--checkpoint-every", "50", "--log-every", "10"]


def _command(run_dir: Path) -> list[str]:
    return [HOROVODRUN, "-np", "2", "-H", "localhost:2", "--gloo", PYTHON, "-m", "dtrain", *ARGS,
            "--run-dir", str(run_dir)]


def _start(run_dir: Path, log: Path) -> subprocess.Popen[bytes]:
    return start_job(_command(run_dir), log)


def _finish(run_dir: Path, log: Path) -> dict:
    proc = _start(run_dir, log)
    assert proc.wait(timeout=300) == 0, log.read_text()[-5000:]
    return json.loads((run_dir / "summary.json").read_text())


def _wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen[bytes]) -> int:
    def reached() -> int | None:
        lines = metrics_lines(run_dir)
        if lines and lines[-1]["step"] >= step and Checkpointer(str(run_dir / "checkpoints")).list():
            return int(lines[-1]["step"])
        return None

    return int(wait_for(f"step {step}", reached, proc))


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict:
    run = tmp_path_factory.mktemp("reference")
    return _finish(run, run / "log.txt")


@pytest.mark.distributed
@pytest.mark.timeout(600)
def test_sigkill_whole_job_then_rerun_ends_with_same_model(reference, tmp_path):
    run, log = tmp_path / "run", tmp_path / "log.txt"
    proc = _start(run, log)
    killed_at = _wait_for_step(run, 230, proc)
    kill_tree(proc)  # every process of the job at once: horovodrun, both ranks, the Dask workers
    assert killed_at < reference["steps"]
    summary = _finish(run, log)
    assert "resuming from" in log.read_text()
    assert summary["steps"] == reference["steps"]
    assert summary["model_sha256"] == reference["model_sha256"]


@pytest.mark.distributed
@pytest.mark.timeout(600)
def test_sigterm_to_launcher_checkpoints_then_resumes_exactly(reference, tmp_path):
    run, log = tmp_path / "run", tmp_path / "log.txt"
    proc = _start(run, log)
    _wait_for_step(run, 120, proc)
    proc.send_signal(signal.SIGTERM)  # as Kubernetes does on preemption; horovodrun forwards it
    proc.wait(timeout=60)
    text = log.read_text()
    assert "Exit code: 143" in text or "exit with status code 143" in text, text[-3000:]
    stopped = [line for line in text.splitlines() if "stopped at step" in line]
    assert stopped, text[-3000:]
    step = int(stopped[0].split("stopped at step ")[1].split(";")[0])
    assert step % 50 != 0 or step > 0
    # The final checkpoint is exactly where the ranks stopped (not just the last periodic one).
    assert Checkpointer(str(run / "checkpoints")).list()[-1][0] == step
    summary = _finish(run, log)
    assert summary["model_sha256"] == reference["model_sha256"]


@pytest.mark.unit
@pytest.mark.timeout(120)
def test_kill_during_checkpoint_write_keeps_previous(tmp_path):
    root = tmp_path / "ckpt"
    script = textwrap.dedent(f"""
        import torch, sys
        from dtrain.checkpoint import Checkpointer
        ck = Checkpointer({str(root)!r})
        ck.write(1, {{"w": torch.ones(10)}})
        print("first", flush=True)
        ck.write(2, {{"w": torch.zeros(200_000_000)}})  # 800 MB: slow enough to be caught mid-write
        print("second", flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "first"
    deadline = time.monotonic() + 60
    while not any(p.name.startswith(".step-00000002") for p in root.iterdir()):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    found = Checkpointer(str(root)).latest()
    assert found is not None
    assert found[1]["w"].shape == (10,)  # step 1, intact
    assert [s for s, _ in Checkpointer(str(root)).list()] == [1]
