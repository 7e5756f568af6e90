"""The coordinator's stop on a signal (dtrain/coordinator.py), in real processes receiving real signals."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = [pytest.mark.unit, pytest.mark.timeout(120)]

SCRIPT = """
import os, signal, sys, time
from pathlib import Path
from dtrain.config import Config
from dtrain.coordinator import Coordinator

out = Path(sys.argv[1])
coord = Coordinator(Config(), str(out / "checkpoints"))
coord.install_signal_handlers()

def save():
    # This rank's own signal(s) arriving while it saves, after the others' vote stopped it.
    for _ in range({signals}):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.2)  # Python runs the handler between bytecodes
    (out / "saved").write_text("ok")

print("status", coord.save_and_stop(save), flush=True)
print("restored", signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, flush=True)
"""


def _run(tmp_path: Path, signals: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(SCRIPT.format(signals=signals)), str(tmp_path)],
                          capture_output=True, text=True, timeout=60)


def test_a_first_signal_while_saving_after_a_stop_is_noted_and_the_save_completes(tmp_path: Path) -> None:
    proc = _run(tmp_path, 1)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "saved").read_text() == "ok"
    assert "status 143" in proc.stdout and "restored True" in proc.stdout  # 128 + SIGTERM; handlers given back
    assert "SIGTERM received" in proc.stderr


def test_a_second_signal_while_saving_stops_at_once(tmp_path: Path) -> None:
    proc = _run(tmp_path, 2)
    assert proc.returncode == -signal.SIGTERM
    assert not (tmp_path / "saved").exists()
