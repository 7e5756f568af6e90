"""Progress: a live bar in a terminal, plain lines (no bar characters) when output goes to a file."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys

import pytest
from conftest import REPO, _env

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]

ARGS = ["-m", "dtrain", "--gen-rows", "6000", "--epochs", "2", "--log-every", "5"]


def test_terminal_shows_a_live_bar(tmp_path):
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, *ARGS, "--run-dir", str(tmp_path / "tty")], cwd=REPO, env=_env(),
                            stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    out = b""
    while True:
        ready, _, _ = select.select([master], [], [], 1.0)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            out += chunk
        elif proc.poll() is not None:
            break
    assert proc.wait(timeout=60) == 0, out.decode(errors="replace")[-3000:]
    text = out.decode(errors="replace")
    assert "epoch 0:" in text and "epoch 1:" in text
    assert "%|" in text and "\r" in text  # a tqdm bar, redrawn in place
    assert "samples_s=" in text and "loss=" in text


def test_file_output_has_no_bar(tmp_path):
    log = tmp_path / "out.txt"
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, *ARGS, "--run-dir", str(tmp_path / "file"), "--progress-seconds",
                               "0.5"], cwd=REPO, env=_env(), stdout=f, stderr=subprocess.STDOUT, timeout=240)
    text = log.read_text()
    assert proc.returncode == 0, text[-3000:]
    assert "%|" not in text and "\r" not in text and "█" not in text
    assert "done:" in text
