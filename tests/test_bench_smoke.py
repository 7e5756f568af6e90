"""``python -m dtrain.bench B3 --quick``: the suite runs its contenders for real (horovodrun -np 2).

It checks that every contender ran and reported, never how fast: benchmarks are not timed asserts.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(300)]


def test_quick_ceiling_benchmark_runs_every_contender(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "dtrain.bench", "B3", "--quick", "--models", "small",
                           "--json", str(out)], cwd=REPO, capture_output=True, text=True, timeout=280,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    report = json.loads(out.read_text())
    (comp,) = report["benchmarks"]["B3"]["comparisons"]
    assert comp["model"] == "small" and comp["global_batch"] == 128
    assert set(comp["contenders"]) == {"bare", "dtrain step", "dtrain e2e"}
    for name, s in comp["contenders"].items():
        assert s["failed"] == 0 and s["samples_per_sec"] > 0, name
    (target,) = report["targets"]
    assert target["name"] == "dtrain step / bare" and target["target"] == 0.8 and target["met"] in (True, False)
    assert "target >= 0.80" in proc.stdout and "targets (" in proc.stdout


def test_paired_overhead_run_times_both_steps_in_one_process():
    """B1's paired contender: dtrain's step and the bare loop alternated, a ratio per pair of windows."""
    from dtrain.tools.benchstats import parse_result

    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "peers" / "paired.py"), "--model", "small",
                           "--warmup", "2", "--windows", "3", "--window-seconds", "0.2"], cwd=REPO, capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    result = parse_result(proc.stdout)
    assert result is not None and result["contender"] == "paired" and result["world_size"] == 1
    ours, theirs, ratios = result["samples_per_sec"], result["bare_samples_per_sec"], result["paired_ratios"]
    assert len(ours) == len(theirs) == len(ratios) == 4 and min(ours + theirs) > 0  # 3 rounded up: even pairs
    assert ratios == [a / b for a, b in zip(ours, theirs, strict=True)]
    assert result["transport"] == "none" and result["sharded"] is False and result["torch_threads_default"] >= 1
