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
