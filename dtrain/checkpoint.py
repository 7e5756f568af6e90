"""Checkpoints that are either complete and verified or ignored, written through fsspec.

Layout under ``<run dir>/checkpoints/``::

    step-00000120/state.pt        torch.save of the trainer's state dict
    step-00000120/MANIFEST.json   written last: sha256 and size of state.pt, step, versions

A checkpoint counts only once its manifest exists and the state's checksum matches it, so a crash at
any point of a save leaves the previous good checkpoint the one that is loaded. On local disks the
directory is written under a temporary name, fsynced and renamed; on object stores (no rename) the
manifest written last is the commit marker.

Writes happen on a background thread, one at a time: the loop only pays for an in-memory copy, and
not even for all of it. As in CheckFreq (Mohan et al., FAST '21), tensors that only the optimizer's
step changes (parameters, optimizer moments) are copied on the writer thread while the loop runs the
next forward and backward passes; the loop calls ``fence()`` before its next ``optimizer.step()``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import fsspec
import torch

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
_NAME = re.compile(r"^step-(\d{8,})$")
TMP_MARK = ".tmp-"  # a checkpoint being written locally: .step-N.tmp-XXXXXXXX
_TMP_NAME = re.compile(r"^\.step-\d{8,}\.tmp-[0-9a-f]{8}$")


def model_sha256(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of a model's parameters and buffers, in a canonical order.

    For each entry of the state dict in sorted-name order: the name (UTF-8), the dtype and shape as
    text, then the tensor's bytes (contiguous, CPU, native little-endian). Equal models hash equal
    whatever their device or memory layout.
    """
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def snapshot(obj: Any, buffers: dict[str, torch.Tensor] | None = None, _path: str = "",
             defer: Callable[[torch.Tensor], bool] | None = None,
             pending: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> Any:
    """A deep copy of ``obj`` with every tensor copied to CPU: safe to write while training goes on.

    With ``buffers``, tensors are copied into the buffers of the previous snapshot where shapes and
    dtypes match: a fresh allocation per checkpoint costs more in page faults than the copy itself.
    With ``defer``, the tensors it selects are not copied yet: their ``(buffer, source)`` pairs are
    appended to ``pending`` for the caller to copy later (see ``Checkpointer.save_async``).
    """
    if isinstance(obj, torch.Tensor):
        src = obj.detach()
        buf = buffers.get(_path) if buffers is not None else None
        if buf is None or buf.shape != src.shape or buf.dtype != src.dtype:
            buf = torch.empty(src.shape, dtype=src.dtype, device="cpu")
            if buffers is not None:
                buffers[_path] = buf
        if defer is not None and pending is not None and defer(src):
            pending.append((buf, src))
            return buf
        return buf.copy_(src)
    if isinstance(obj, Mapping):
        return {k: snapshot(v, buffers, f"{_path}/{k}", defer, pending) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(snapshot(v, buffers, f"{_path}/{i}", defer, pending) for i, v in enumerate(obj))
    return obj


# The writer thread's nice value. On a CPU machine training keeps every core busy, and a writer at the
# same priority preempts the training threads, whose parallel regions then wait for the slowest.
WRITER_NICE = 10


def _lower_priority() -> None:
    """Make the calling thread yield the cores to training (Linux: a thread has its own nice value)."""
    with contextlib.suppress(AttributeError, OSError):  # not Linux, or not permitted: the write competes
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WRITER_NICE)


class CheckpointError(Exception):
    pass


def _fsync_local(fs: fsspec.AbstractFileSystem, path: str) -> None:
    if "file" in fs.protocol or "local" in fs.protocol:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class Checkpointer:
    """Saves and finds checkpoints under ``root`` (a local path or fsspec URL)."""

    def __init__(self, root: str, keep: int = 3):
        self.fs, self.root = fsspec.core.url_to_fs(root)
        self.keep = keep
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._buffers: dict[str, torch.Tensor] = {}  # reused by save_async: one write in flight at most
        self._staged = threading.Event()  # set once the write in flight has copied its deferred tensors
        self._staged.set()
        self.last_block_seconds = 0.0  # the loop's wait for the last save_async, its fence() included
        self.last_write_seconds = 0.0
        self._step = -1  # of the write in flight

    # -- saving ---------------------------------------------------------------------------------------

    def _path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def write(self, step: int, state: Mapping[str, Any], meta: Mapping[str, Any] | None = None) -> str:
        """Write one checkpoint now (blocking). Returns its path."""
        t0 = time.perf_counter()
        buf = io.BytesIO()
        torch.save(state, buf)
        data = buf.getvalue()
        name = f"step-{step:08d}"
        local = "file" in self.fs.protocol or "local" in self.fs.protocol
        final = self._path(name)
        target = self._path(f".{name}{TMP_MARK}{uuid.uuid4().hex[:8]}") if local else final
        manifest = {"format": FORMAT_VERSION, "step": step, "sha256": hashlib.sha256(data).hexdigest(),
                    "bytes": len(data), "time": time.time(), **(meta or {})}
        try:
            self.fs.makedirs(target, exist_ok=True)
            with self.fs.open(f"{target}/state.pt", "wb") as f:
                f.write(data)
            _fsync_local(self.fs, f"{target}/state.pt")
            with self.fs.open(f"{target}/MANIFEST.json", "w") as f:
                json.dump(manifest, f, indent=1)
            if local:
                _fsync_local(self.fs, f"{target}/MANIFEST.json")
                if self.fs.exists(final):  # a re-save of the same step (e.g. after a rollback)
                    self.fs.rm(final, recursive=True)
                os.replace(target, final)
                _fsync_local(self.fs, self.root)
        except BaseException:
            # A full disk or a store's error: the partial files go (they hold the space that is
            # missing, and an object store's would be a step directory without its manifest).
            with contextlib.suppress(Exception):
                if self.fs.exists(target):
                    self.fs.rm(target, recursive=True)
            raise
        self.last_write_seconds = time.perf_counter() - t0
        try:
            self._prune(step)
        except Exception as e:  # the checkpoint is written; older ones staying is no failure of it
            log.warning("could not remove old checkpoints in %s (%s)", self.root, e)
        return final

    def save_async(self, step: int, state: Mapping[str, Any], meta: Mapping[str, Any] | None = None,
                   defer: Callable[[torch.Tensor], bool] | None = None) -> None:
        """Snapshot ``state`` in memory and write it on a background thread (one write at a time).

        Tensors selected by ``defer`` are copied on that thread instead: the caller promises not to
        change them before calling ``fence()``.
        """
        t0 = time.perf_counter()
        self.wait()  # the previous write is done with the buffers
        pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        snap = snapshot(state, self._buffers, defer=defer, pending=pending)
        self._staged.clear()
        self._step = step
        self.last_block_seconds = time.perf_counter() - t0

        def target() -> None:
            _lower_priority()
            try:
                try:
                    for buf, src in pending:
                        buf.copy_(src)
                finally:
                    self._staged.set()
                self.write(step, snap, meta)
            except BaseException as e:  # reported by the next wait(), never lost
                self._error = e

        self._thread = threading.Thread(target=target, name="dtrain-checkpoint", daemon=False)
        self._thread.start()

    def fence(self) -> float:
        """Return once the write in flight no longer reads the caller's tensors (its deferred copies
        are done), with the seconds waited; the wait also counts in ``last_block_seconds``."""
        if self._staged.is_set():
            return 0.0
        t0 = time.perf_counter()
        self._staged.wait()
        waited = time.perf_counter() - t0
        self.last_block_seconds += waited
        return waited

    def collect(self, block: bool = False) -> tuple[int, BaseException | None] | None:
        """The step and error (None: written) of the last async write once it has ended, reported once;
        None while it runs (``block``: wait for it) or when there is none to report."""
        thread = self._thread
        if thread is None or (thread.is_alive() and not block):
            return None
        thread.join()
        self._thread = None
        err, self._error = self._error, None
        return self._step, err

    def wait(self) -> None:
        """Wait for the write in flight; raise if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise CheckpointError(f"checkpoint write failed: {err}") from err

    def _prune(self, written: int) -> None:
        """Keep the ``keep`` newest checkpoints up to the one just written.

        Checkpoints *after* it belong to an abandoned timeline (the run resumed from an earlier one,
        e.g. because they were corrupt) and would mislead the next ``--resume auto``: they go first.
        """
        entries = self.list()
        abandoned = [path for step, path in entries if step > written]
        kept = [path for step, path in entries if step <= written]
        for path in abandoned + kept[: -self.keep]:
            self.fs.rm(path, recursive=True)

    # -- finding and loading --------------------------------------------------------------------------

    def _entries(self) -> list[str]:
        try:
            return [e.rstrip("/") for e in self.fs.ls(self.root, detail=False)]
        except FileNotFoundError:
            return []

    def steps(self) -> list[tuple[int, str]]:
        """Every step directory, committed or not, oldest first."""
        out = []
        for e in self._entries():
            m = _NAME.match(e.rsplit("/", 1)[-1])
            if m:
                out.append((int(m.group(1)), e))
        return sorted(out)

    def list(self) -> list[tuple[int, str]]:
        """Committed checkpoints (manifest present), oldest first. Not yet verified."""
        return [(step, e) for step, e in self.steps() if self.fs.exists(f"{e}/MANIFEST.json")]

    def sweep(self) -> tuple[str, ...]:
        """Remove the temporary directories of local writes that never finished (a crashed or killed
        run's); returns them. Only at start: no write of this run is in flight then."""
        stale = tuple(e for e in self._entries() if _TMP_NAME.match(e.rsplit("/", 1)[-1]))
        for path in stale:
            self.fs.rm(path, recursive=True)
        return stale

    def load_path(self, path: str) -> dict[str, Any]:
        """Load and verify one checkpoint directory; CheckpointError if it is incomplete or corrupt."""
        return _read_verified(self.fs, path)

    def latest(self) -> tuple[str, dict[str, Any]] | None:
        """The newest checkpoint that verifies, skipping (with a warning) any that do not."""
        for _, path in reversed(self.steps()):
            try:
                if not self.fs.exists(f"{path}/MANIFEST.json"):  # deleted, or never committed
                    raise CheckpointError(f"{path}: no MANIFEST.json (incomplete or damaged)")
                return path, self.load_path(path)
            except CheckpointError as e:
                log.warning("skipping checkpoint: %s", e)
        return None


def _read_verified(fs: fsspec.AbstractFileSystem, path: str) -> dict[str, Any]:
    try:
        with fs.open(f"{path}/MANIFEST.json") as f:
            manifest = json.load(f)
        with fs.open(f"{path}/state.pt", "rb") as f:
            data = f.read()
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable ({e})") from None
    if len(data) != manifest.get("bytes") or hashlib.sha256(data).hexdigest() != manifest.get("sha256"):
        raise CheckpointError(f"{path}: checksum mismatch (truncated or corrupted)")
    state: dict[str, Any] = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
    return state


def load(url: str) -> dict[str, Any]:
    """Load and verify the checkpoint directory at ``url`` (a path or fsspec URL)."""
    fs, path = fsspec.core.url_to_fs(url)
    return _read_verified(fs, path.rstrip("/"))
