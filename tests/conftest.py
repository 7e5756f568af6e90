"""Shared fixtures: real processes, real horovodrun, a real Dask LocalCluster."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
HOROVODRUN = shutil.which("horovodrun", path=str(Path(PYTHON).parent)) or "horovodrun"
_RANK_LINE = re.compile(r"^\[(\d+)\]<(stdout|stderr)>:(.*)$")


@dataclass
class Result:
    """A finished dtrain process or horovodrun job."""

    returncode: int
    stdout: str
    stderr: str
    run_dir: Path | None
    ranks: dict[int, str] = field(default_factory=dict)  # rank -> its output lines (horovodrun only)

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def summary(self) -> dict[str, Any]:
        assert self.run_dir is not None
        return json.loads((self.run_dir / "summary.json").read_text())

    def metrics(self) -> list[dict[str, Any]]:
        assert self.run_dir is not None
        return [json.loads(line) for line in (self.run_dir / "metrics.jsonl").read_text().splitlines()]

    def check(self) -> Result:
        assert self.returncode == 0, f"exit {self.returncode}\n{self.output[-6000:]}"
        return self


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", DTRAIN_LOG_LEVEL="INFO")
    env.update(extra or {})
    return env


def _run(cmd: Sequence[str], run_dir: Path | None, timeout: float, env: dict[str, str] | None) -> Result:
    proc = subprocess.run(list(cmd), cwd=REPO, env=_env(env), capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)
    ranks: dict[int, list[str]] = {}
    for line in (proc.stdout + proc.stderr).splitlines():
        m = _RANK_LINE.match(line)
        if m:
            ranks.setdefault(int(m.group(1)), []).append(m.group(3))
    return Result(proc.returncode, proc.stdout, proc.stderr, run_dir,
                  {r: "\n".join(lines) for r, lines in ranks.items()})


def _with_run_dir(args: Sequence[str], run_dir: Path | None) -> list[str]:
    args = list(args)
    if run_dir is not None and "--run-dir" not in args:
        args += ["--run-dir", str(run_dir)]
    return args


@pytest.fixture
def dtrain_local(tmp_path: Path):
    """Run ``python -m dtrain ARGS`` as one plain process (no horovodrun)."""

    def run(args: Sequence[str], run_dir: Path | None = None, timeout: float = 240,
            env: dict[str, str] | None = None, module: str = "dtrain") -> Result:
        run_dir = run_dir or tmp_path / "run-local"
        return _run([PYTHON, "-m", module, *_with_run_dir(args, run_dir)], run_dir, timeout, env)

    return run


@pytest.fixture
def horovodrun(tmp_path: Path):
    """Run ``python -m dtrain ARGS`` (or a script) under ``horovodrun -np N -H localhost:N --gloo``."""

    def run(args: Sequence[str], np: int = 2, run_dir: Path | None = None, timeout: float = 300,
            env: dict[str, str] | None = None, script: str | None = None) -> Result:
        run_dir = run_dir or tmp_path / f"run-np{np}"
        target = [PYTHON, script] if script else [PYTHON, "-m", "dtrain"]
        cmd = [HOROVODRUN, "-np", str(np), "-H", f"localhost:{np}", "--gloo", *target]
        return _run([*cmd, *(_with_run_dir(args, run_dir) if not script else args)],
                    run_dir if not script else None, timeout, env)

    return run


@pytest.fixture(scope="session")
def dask_client() -> Iterator[Any]:
    """A real in-machine Dask cluster (separate worker process) for cluster tests."""
    from distributed import Client, LocalCluster

    from dtrain.cluster import worker_environment

    with worker_environment():  # the workers as dtrain starts its own
        cluster = LocalCluster(n_workers=1, threads_per_worker=2, processes=True, dashboard_address=":0",
                               host="127.0.0.1")
    with cluster, Client(cluster) as client:
        yield client


# -- file systems that fail for real ------------------------------------------------------------------


@pytest.fixture
def mount_tmpfs() -> Iterator[Any]:
    """``mount(path, size=None, ro=False)``: a real tmpfs at ``path`` (small ones fill up, read-only ones
    refuse writes), unmounted after the test. Skips where mounting is not allowed (not root)."""
    mounted: list[Path] = []

    def mount(path: Path, size: str | None = None, ro: bool = False) -> Path:
        if os.geteuid() != 0:
            pytest.skip("mounting a tmpfs needs root")
        path.mkdir(parents=True, exist_ok=True)
        opts = ",".join([*([f"size={size}"] if size else []), *(["ro"] if ro else [])]) or "defaults"
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True,
                              text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
        mounted.append(path)
        return path

    def remount_ro(path: Path) -> None:
        subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)

    mount.remount_ro = remount_ro  # type: ignore[attr-defined]
    try:
        yield mount
    finally:
        for path in reversed(mounted):
            subprocess.run(["umount", "-l", str(path)], check=False)


# -- long-running jobs that tests interrupt ---------------------------------------------------------


def start_job(cmd: Sequence[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start ``cmd`` in its own session, output appended to ``log``."""
    with open(log, "ab") as out:
        return subprocess.Popen(list(cmd), cwd=REPO, env=_env(env), stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)


def metrics_lines(run_dir: Path) -> list[dict[str, Any]]:
    """The complete step lines of a run's metrics so far."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}") and '"loss"' in line]


def wait_for(what: str, check: Any, proc: subprocess.Popen[bytes], timeout: float = 200) -> Any:
    """Poll ``check()`` until it returns something truthy; fail if ``proc`` ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        assert proc.poll() is None, f"the job ended before {what}"
        time.sleep(0.05)
    raise AssertionError(f"{what}: not within {timeout}s")


def kill_tree(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL ``proc`` and every process below it at once."""
    parent = psutil.Process(proc.pid)
    for p in [*parent.children(recursive=True), parent]:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    proc.wait(timeout=30)


# -- several hosts: the test bed of launch/testbed.sh -----------------------------------------------


@pytest.fixture(scope="session")
def testbed_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Hosts h1, h2 and h3 (network namespaces with their own sshd and core), up for the session; h3
    shares h1's core and serves the runs on three hosts only."""
    import testbed as tb

    reason = tb.unavailable()
    if reason:
        pytest.skip(reason)
    bed = tb.Testbed(3, tmp_path_factory.mktemp("testbed"))
    bed.up()
    try:
        yield bed
    finally:
        bed.down()


@pytest.fixture
def testbed(testbed_session: Any) -> Iterator[Any]:
    """The test bed, put back after the test whatever its outcome: processes the test started on the
    hosts killed, links up, unshaped and lossless, lost hosts' sshd running again."""
    try:
        yield testbed_session
    finally:
        testbed_session.clean()
