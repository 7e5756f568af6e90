"""Storage faults: what is checked before training, and when a failed checkpoint is tried again.

* :func:`probe` writes, fsyncs, renames and removes a small file where the run will write (through
  fsspec, so URLs are probed the way checkpoints are written), so a read-only or missing location is
  one line at start instead of a traceback after the work is done.
* :func:`check_room` compares a local location's free space with what the run will write there
  (:func:`checkpoint_bytes` estimates one checkpoint of the model).
* :class:`SaveRetry` decides, without any I/O, whether a due checkpoint is attempted after failures:
  the next due point after a first failure, then every 2nd, 4th, ... due point, so a full disk costs a
  warning and an occasional try, not a failed write at every step.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterable
from dataclasses import dataclass

import fsspec

from dtrain.config import UserError


class StorageError(Exception):
    """Work could not be saved where asked, and was saved elsewhere: one line naming both, exit 1."""


class ClusterLost(Exception):
    """Every rank stopped at the same step because the Dask scheduler went away: one line, exit 1."""

    def __init__(self, address: str, step: int, retry: SaveRetry):
        saved = (f"checkpoint saved at step {step}" if not retry.failures
                 else f"the checkpoint of step {step} failed ({retry.last_error}), the last good one is of step "
                      f"{retry.last_good_step}")
        super().__init__(f"lost the Dask scheduler at {address}; {saved}; rerun the same command once the "
                         "cluster is back")


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol
    return "file" in protocols or "local" in protocols


def reason(error: BaseException) -> str:
    """An error as a short phrase: the OS's words for OS errors (``No space left on device``)."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    text = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def probe(url: str, flag: str, shown: str | None = None) -> None:
    """Create ``url`` if needed, then write, fsync, rename and remove a probe file in it.

    Raises UserError (one line naming ``flag`` and ``shown``, default ``url``) if any of it fails.
    Everything an object store's client raises counts: its errors are not always OSErrors.
    """
    fs, root = fsspec.core.url_to_fs(url)
    root = root.rstrip("/") or "/"
    name = f".dtrain-probe-{uuid.uuid4().hex[:8]}"
    tmp, final = f"{root}/{name}.tmp", f"{root}/{name}"
    try:
        fs.makedirs(root, exist_ok=True)
        with fs.open(tmp, "wb") as f:
            f.write(b"\0" * 4096)
            if is_local(fs):
                f.flush()
                os.fsync(f.fileno())
        fs.mv(tmp, final)
        fs.rm(final)
    except Exception as e:
        for path in (tmp, final):  # on a file system that allows removing only
            with contextlib.suppress(Exception):
                fs.rm(path)
        raise UserError(f"{flag}: cannot write to {shown or url!r} ({reason(e)}); choose a writable location "
                        f"with {flag} or make this one writable") from None


def free_bytes(path: str) -> int | None:
    """Free bytes of the local file system holding ``path`` (or its nearest existing parent)."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            return None
        path = parent
    return shutil.disk_usage(path).free


def check_room(url: str, need: int, flag: str, what: str) -> None:
    """UserError unless the local location ``url`` has ``need`` bytes free (URLs are not checked:
    object stores have no free space to ask about)."""
    fs, root = fsspec.core.url_to_fs(url)
    if not is_local(fs):
        return
    free = free_bytes(root)
    if free is not None and free < need:
        raise UserError(f"{flag}: {url!r} has {_size(free)} free, {what} needs about {_size(need)}; "
                        f"free some space or choose another location with {flag}")


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


# Tensors an optimizer keeps per parameter (momentum, Adam's two moments, Adagrad's sum).
_OPTIMIZER_SLOTS = {"sgd": 1, "adam": 2, "adamw": 2, "adagrad": 1}
# What a checkpoint holds beyond the tensors (statistics, config, pickling), generously.
CHECKPOINT_OVERHEAD = 64 << 10


def checkpoint_bytes(tensor_bytes: Iterable[int], optimizer: str, momentum: float = 0.0) -> int:
    """About how many bytes one checkpoint of a model takes: its parameters and buffers
    (``tensor_bytes``), as many again per optimizer slot, plus the rest of the state."""
    slots = _OPTIMIZER_SLOTS.get(optimizer, 2)
    if optimizer == "sgd" and not momentum:
        slots = 0
    return sum(tensor_bytes) * (1 + slots) + CHECKPOINT_OVERHEAD


@dataclass
class SaveRetry:
    """When to try a due checkpoint again after failed ones (pure logic, no I/O).

    After the first failure of a streak the next due point tries again; each further failure doubles
    the due points between tries (1, 2, 4, ... up to ``max_gap``). A success ends the streak.
    """

    max_gap: int = 16
    failures: int = 0  # failed saves in a row
    total_failures: int = 0
    skip: int = 0  # due points still to pass over before the next try
    last_error: str | None = None
    last_good_step: int | None = None

    def attempt(self) -> bool:
        """At a due point: whether to save now (False: passed over, as the interval has grown)."""
        if self.skip:
            self.skip -= 1
            return False
        return True

    def failed(self, error: str) -> bool:
        """Record a failed save; True when this is the first of a streak (the one to warn about)."""
        self.failures += 1
        self.total_failures += 1
        self.last_error = error
        self.skip = min(2 ** (self.failures - 1) - 1, self.max_gap - 1)
        return self.failures == 1

    def succeeded(self, step: int) -> bool:
        """Record a good save; True when it ends a streak of failures."""
        recovered = self.failures > 0
        self.failures, self.skip, self.last_good_step = 0, 0, step
        return recovered

    def next_gap(self) -> int:
        """Due points from here to the next try (1: the next one)."""
        return self.skip + 1

    def report(self) -> dict[str, object]:
        """What summary.json says about checkpoint failures (nothing when there were none)."""
        if not self.total_failures:
            return {}
        return {"checkpoint_failures": self.total_failures, "checkpoint_error": self.last_error,
                "checkpoints_failing": self.failures > 0, "last_checkpoint_step": self.last_good_step}
