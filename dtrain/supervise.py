"""How a rank ended, told to the other ranks: "rank 1 on host-b was killed by SIGKILL".

A rank killed by a signal prints nothing, and the survivors only learn from Gloo that a peer is gone;
only the parent of a process learns how it ended. So under a fixed-size ``horovodrun`` each rank's
process forks at start: the child trains, the parent waits for it, forwards the signals it receives
(horovodrun signals the process it started), records an abnormal end in horovodrun's rendezvous
key-value store (reachable from every host of the job) and exits the way the child did. A survivor
that sees a peer fail reads the record (:func:`peer_end`) and names the rank, its host and how it ended.

A partition kills no process, so nothing is recorded; and Gloo's timeout does not say which peer went
silent. So each parent also keeps a heartbeat in the store (a counter it bumps every :data:`BEAT`
seconds, from its own thread: nothing in the training step). A survivor that finds no record reads the
counters twice, a few beats apart: a rank whose counter did not move cannot reach the store, and is
named as unreachable. Counters, not timestamps, so hosts' clocks need not agree.

Not in elastic runs, where Horovod's driver handles failed ranks itself, nor outside horovodrun.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

_SCOPE = "dtrain-ends"
_CHILD = "DTRAIN_SUPERVISED"  # set in the child: never fork twice
_FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
_PR_SET_PDEATHSIG = 1
BEAT = 1.0  # seconds between a parent's heartbeats; a survivor waits several before naming a silent rank
# The exit status of a rank that stopped because another one failed (dtrain/cli.py). Not recorded as a
# failure: with more than two ranks, a survivor reading the records would name it instead of the cause;
# its parent marks it as following instead, so that its stilled heartbeat names nobody either.
FOLLOWED = 3


def describe(status: int, forwarded: bool) -> str | None:
    """How a rank ended, from its ``waitpid`` status, for the other ranks; None when there is nothing to
    tell them: a normal end, bad input (every rank reports it), or a stop on a signal this process
    forwarded (the whole job is being stopped)."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        return None if forwarded and sig in _FORWARDED else f"was killed by {name}"
    code = os.WEXITSTATUS(status)
    if code in (0, 2, FOLLOWED) or (forwarded and code > 128):
        return None
    return f"exited with status {code}"


def _store() -> str | None:
    addr, port = os.environ.get("HOROVOD_GLOO_RENDEZVOUS_ADDR"), os.environ.get("HOROVOD_GLOO_RENDEZVOUS_PORT")
    return f"http://{addr}:{port}/{_SCOPE}" if addr and port else None


def host() -> str:
    """This rank's host as horovodrun names it (``-H``), else the machine's name."""
    return os.environ.get("HOROVOD_HOSTNAME") or socket.gethostname()


def wanted() -> bool:
    return (os.environ.get("HOROVOD_RANK") is not None and _store() is not None and hasattr(os, "fork")
            and os.environ.get("HOROVOD_ELASTIC") != "1" and os.environ.get(_CHILD) is None)


def supervise() -> None:
    """Fork: the child returns (and trains), the parent waits, records how it ended, and exits alike."""
    if not wanted():
        return
    parent = os.getpid()
    os.environ[_CHILD] = "1"
    pid = os.fork()
    if pid == 0:
        # The parent killed (horovodrun's last resort): the child goes with it, not on as an orphan.
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:
            os._exit(1)
        return
    forwarded = [False]

    def forward(signum: int, frame: object) -> None:
        forwarded[0] = True
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)

    for sig in _FORWARDED:
        signal.signal(sig, forward)
    threading.Thread(target=_beat, args=(int(os.environ["HOROVOD_RANK"]),), name="dtrain-heartbeat",
                     daemon=True).start()
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except ChildProcessError:
            os._exit(1)
        except InterruptedError:
            continue
    told = describe(status, forwarded[0])
    rank = int(os.environ["HOROVOD_RANK"])
    with contextlib.suppress(Exception):  # the job is ending: nothing more to do if this fails
        if told is not None:
            record(rank, f"rank {rank} on {host()} {told}")
        elif os.WIFEXITED(status) and os.WEXITSTATUS(status) == FOLLOWED:
            _put(f"followed-{rank}", "1")
    sys.stdout.flush()
    sys.stderr.flush()
    if os.WIFSIGNALED(status):
        code = os.WTERMSIG(status)
        with contextlib.suppress(OSError, ValueError):  # SIGKILL and SIGSTOP take no handler: default already
            signal.signal(code, signal.SIG_DFL)
        os.kill(os.getpid(), code)  # end as the child did, so horovodrun reports the same
    os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 1)


def _put(key: str, text: str) -> None:
    url = _store()
    if url is None:
        return
    data = text.encode()
    req = urllib.request.Request(f"{url}/{key}", data=data, method="PUT",
                                 headers={"Content-Length": str(len(data))})
    with urllib.request.urlopen(req, timeout=2):
        pass


def _get(key: str) -> str | None:
    url = _store()
    if url is None:
        return None
    try:
        with urllib.request.urlopen(f"{url}/{key}", timeout=1) as r:
            return str(r.read().decode())
    except (urllib.error.URLError, OSError):
        return None


def record(rank: int, text: str) -> None:
    _put(f"rank-{rank}", text)


def _beat(rank: int) -> None:
    """Bump this rank's heartbeat (``<count> <host>``) every :data:`BEAT` seconds while the child runs."""
    count = 0
    while True:
        count += 1
        with contextlib.suppress(Exception):  # a missed beat is what a survivor looks for: nothing to do
            _put(f"beat-{rank}", f"{count} {host()}")
        time.sleep(BEAT)


def beats(me: int, world: int) -> dict[int, str]:
    """The other ranks' heartbeats as read now (ranks whose beat cannot be read are left out)."""
    got = {rank: _get(f"beat-{rank}") for rank in range(world) if rank != me}
    return {rank: text for rank, text in got.items() if text is not None}


def silent(before: dict[int, str], after: dict[int, str]) -> list[tuple[int, str]]:
    """The ranks (and their hosts) whose heartbeat did not move between two reads."""
    return [(rank, text.partition(" ")[2]) for rank, text in sorted(before.items()) if after.get(rank) == text]


def unanswered(ranks: list[tuple[int, str]]) -> str:
    """``rank 2 on h2 stopped answering (...); rerun the same command once h2 is back``."""
    who = ", ".join(f"rank {rank} on {name}" for rank, name in ranks)
    hosts = list(dict.fromkeys(name for _, name in ranks))
    return (f"{who} stopped answering (network unreachable or host down); "
            f"rerun the same command once {' and '.join(hosts)} {'is' if len(hosts) == 1 else 'are'} back")


def peer_end(me: int, world: int, wait: float = 3.0) -> tuple[str, bool] | None:
    """The record of another rank's abnormal end (``rank 1 on host-b was killed by SIGKILL``, False),
    waiting up to ``wait`` seconds for its parent to write it; failing that, the ranks whose heartbeat
    stood still meanwhile (:func:`unanswered`, True); None if neither (e.g. the store is out of reach)."""
    if _store() is None:
        return None
    # Several beats apart, so a live but loaded parent has time to bump its counter.
    wait = max(wait, 3 * BEAT)
    before = beats(me, world)
    deadline = time.monotonic() + wait
    while True:
        for rank in range(world):
            if rank != me and (text := _get(f"rank-{rank}")) is not None:
                return text, False
        if time.monotonic() >= deadline:
            break
        time.sleep(0.1)
    gone = [(rank, name) for rank, name in silent(before, beats(me, world)) if _get(f"followed-{rank}") is None]
    return (unanswered(gone), True) if gone else None


class Watch:
    """Ends this rank, with one line, when a blocking collective waits on a peer whose heartbeat stands
    still (a partition or a lost host that sends no FIN), rather than after the collective's timeout.

    Gloo's own timeout cannot tell a silent peer from a slow one (a rank waiting for its data, a long
    checkpoint), so the groups across hosts keep a long one, and this watch tells them apart by the
    heartbeats that supervising parents keep. ``inside()`` wraps each collective across hosts; after
    ``stall`` seconds inside one, a thread reads the peers' heartbeats a few beats apart, and if one of
    ``peers`` stood still, prints ``dtrain: error: rank R stopped because another rank failed: ...`` and
    exits with ``FOLLOWED``; if it can read none, this rank is the one cut off, and says so.
    """

    def __init__(self, rank: int, world: int, peers: set[int], stall: float = 10.0):
        self.rank, self.world, self.peers, self.stall = rank, world, peers, stall
        self._since: float | None = None
        self._calls = 0
        if _store() is not None and os.environ.get(_CHILD) is not None:  # heartbeats are kept
            threading.Thread(target=self._run, name="dtrain-watch", daemon=True).start()

    @contextlib.contextmanager
    def inside(self) -> Iterator[None]:
        self._calls += 1
        self._since = time.monotonic()
        try:
            yield
        finally:
            self._since = None

    def _run(self) -> None:
        while True:
            time.sleep(BEAT)
            since, call = self._since, self._calls
            if since is None or time.monotonic() - since < self.stall:
                continue
            before = beats(self.rank, self.world)
            time.sleep(3 * BEAT)
            if self._since != since or self._calls != call:
                continue  # the collective ended meanwhile
            after = beats(self.rank, self.world)
            gone = [(r, name) for r, name in silent(before, after) if r in self.peers]
            if not gone and (before or after):
                continue
            line = (f"rank {self.rank} stopped because another rank failed: {unanswered(gone)}" if gone else
                    f"rank {self.rank} on {host()} lost the job's network (it cannot reach the rendezvous store); "
                    "rerun the same command once it is back")
            print(f"dtrain: error: {line}", file=sys.stderr, flush=True)
            os._exit(FOLLOWED)
