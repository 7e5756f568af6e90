"""The multi-host test bed (launch/testbed.sh) from Python: hosts h1..hN in network namespaces.

``Testbed`` runs commands on a host as a login there would (its network, hostname, /etc/hosts and
core), breaks and mends hosts and links, and after each test puts everything back: processes the
test started on the hosts are killed, links are up and unshaped, killed sshds run again. The Dask
cluster of the multi-host tests (a scheduler on h1, a worker on each host) outlives single tests
and is left alone by that clean-up.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "launch" / "testbed.sh"
VENV_BIN = REPO / ".venv" / "bin"
NIC = "dt0"  # each host's interface on the bed's bridge


def unavailable() -> str | None:
    """Why the test bed cannot run here, or None."""
    if os.geteuid() != 0:
        return "the multi-host test bed needs root (network namespaces)"
    if shutil.which("ip") is None or subprocess.run(["ip", "netns", "list"], capture_output=True).returncode:
        return "no 'ip netns' here (iproute2 with network namespace support)"
    if shutil.which("sshd") is None and not Path("/usr/sbin/sshd").exists():
        return "no sshd here; run launch/setup.sh as root (it installs openssh-server)"
    if shutil.which("nsenter") is None or shutil.which("unshare") is None:
        return "no nsenter/unshare here (util-linux)"
    return None


# Which bed (launch/testbed.sh's DTRAIN_TESTBED_ID): a benchmark's bed may be up beside the tests'.
BED = int(os.environ.get("DTRAIN_TESTBED_ID", "0") or 0)
NAMESPACE_PREFIX = "dt" if BED == 0 else f"dt{BED}"


def address(host: str) -> str:
    return f"10.77.{BED}.{10 + int(host[1:])}"


class Testbed:
    __test__ = False  # a helper, not a test class
    def __init__(self, n: int, state: Path):
        self.hosts = [f"h{i}" for i in range(1, n + 1)]
        self.env = dict(os.environ, DTRAIN_TESTBED_DIR=str(state))
        self.keep: set[int] = set()  # pids (with their children) that survive the clean-up between tests

    def script(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        res = subprocess.run([str(SCRIPT), *args], env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and res.returncode:
            raise RuntimeError(f"testbed.sh {' '.join(args)}: exit {res.returncode}\n{res.stderr}")
        return res

    def up(self) -> None:
        self.script("up", str(len(self.hosts)), timeout=300)

    def down(self) -> None:
        self.script("down", check=False)

    def command(self, host: str, cmd: Sequence[str]) -> list[str]:
        return [str(SCRIPT), "exec", host, *cmd]

    def run(self, host: str, cmd: Sequence[str], timeout: float = 300,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.command(host, cmd), cwd=REPO, env={**self.env, **(env or {})}, text=True,
                              capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)

    def start(self, host: str, cmd: Sequence[str], log: Path, env: dict[str, str] | None = None,
              keep: bool = False) -> subprocess.Popen[bytes]:
        with open(log, "ab") as out:
            proc = subprocess.Popen(self.command(host, cmd), cwd=REPO, env={**self.env, **(env or {})},
                                    stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        if keep:
            self.keep.add(proc.pid)
        return proc

    def pids(self, host: str) -> list[int]:
        out = subprocess.run(["ip", "netns", "pids", f"{NAMESPACE_PREFIX}-{host}"], capture_output=True,
                             text=True).stdout
        return [int(p) for p in out.split()]

    def sshd(self, host: str) -> int | None:
        with contextlib.suppress(OSError, ValueError):
            return int((Path(self.env["DTRAIN_TESTBED_DIR"]) / host / "sshd.pid").read_text())
        return None

    def kept(self) -> set[int]:
        kept = set()
        for pid in self.keep:
            with contextlib.suppress(psutil.NoSuchProcess):
                p = psutil.Process(pid)
                kept |= {pid, *(c.pid for c in p.children(recursive=True))}
        return kept

    def kill_host(self, host: str) -> None:
        """The host is lost: every process on it, its sshd included, SIGKILLed at once."""
        self.script("kill", host)

    def start_host(self, host: str) -> None:
        self.script("start", host)

    def link(self, host: str, up: bool) -> None:
        self.script("link", host, "up" if up else "down")

    def shape(self, host: str, rate: str) -> None:
        self.script("shape", host, rate)

    def loss(self, host: str, percent: int) -> None:
        self.script("loss", host, str(percent))

    def clean(self) -> None:
        """Back to a bed of idle hosts (bar the kept processes), after a test that passed or failed."""
        for host in self.hosts:
            self.link(host, True)
            self.shape(host, "off")
            self.loss(host, 0)
        kept = self.kept()
        for host in self.hosts:
            sshd = self.sshd(host)
            for pid in self.pids(host):
                if pid not in kept and pid != sshd:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            self.start_host(host)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(
                set(self.pids(h)) - kept - {self.sshd(h)} for h in self.hosts):
            time.sleep(0.1)
