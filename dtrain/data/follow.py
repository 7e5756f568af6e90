"""Following a directory for new Parquet files (``--follow``): which files are new, in which order, and
where training stands among them. Pure logic, no I/O, except ``FileWaiter``: the wait for new files at
the end of the last segment, whose listing and checks it is given (``dtrain.data.sources``,
``Dataset.new_files``) and whose collectives make every rank see the same files at the same step.

The files are trained in *segments*: the files present at start are segment 0, and each poll that finds
new files appends one segment holding them. Each segment is one pass of the epoch plan (no shuffle) over
its files in arrival order, so the training position is ``(segment, step)`` exactly as it is
``(epoch, step)`` in the other modes, and a checkpoint that records the segments and that position
resumes at the very next global batch: no row is trained twice or skipped.

Arrival order is modification time, then name (a total order every rank and every rerun agrees on).
A file, once in a segment, is never read as new again, even if it is touched later. Names whose path
below the followed directory has a component starting with ``.`` or ``_`` are ignored: writers write
``_part.parquet`` (or into ``_temporary/``) and rename when done, so a half-written file is never read.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from dtrain import dist
from dtrain.errors import UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FileInfo:
    """A file as listed: its path (or URL), modification time (seconds since the epoch) and size."""

    path: str
    mtime: float
    size: int


@dataclass(frozen=True)
class FileEntry:
    """A file taken into a segment: what the plan and the stream need to read it again identically."""

    path: str
    mtime: float
    size: int
    rows: int  # all rows of the file
    train: int  # rows of the training split (the plan's partition size)
    val: int  # rows held out for evaluation
    offset: int | None  # row id of its first row when dtrain numbers the rows; None: the file has row ids


def ignored(relative: str) -> bool:
    """Whether a path below the followed directory is someone's work in progress or bookkeeping."""
    return any(part.startswith((".", "_")) for part in relative.replace("\\", "/").split("/") if part)


def arrival_order(files: Iterable[FileInfo]) -> list[FileInfo]:
    """Oldest first by modification time; equal times by name."""
    return sorted(files, key=lambda f: (f.mtime, f.path))


def new_files(listing: Iterable[FileInfo], known: set[str]) -> list[FileInfo]:
    """The files of ``listing`` not seen before, in arrival order."""
    return arrival_order(f for f in listing if f.path not in known)


def number_rows(rows: list[int], first: int) -> list[int]:
    """Row id of each file's first row when files of ``rows`` rows are numbered from ``first`` on."""
    out = []
    for n in rows:
        out.append(first)
        first += n
    return out


@dataclass
class Feed:
    """The segments read so far, in training order; saved in checkpoints."""

    segments: list[list[FileEntry]] = field(default_factory=list)
    next_offset: int = 0  # row id the next numbered file starts at

    @property
    def known(self) -> set[str]:
        return {f.path for seg in self.segments for f in seg}

    @property
    def num_files(self) -> int:
        return sum(len(seg) for seg in self.segments)

    def add(self, entries: list[FileEntry]) -> None:
        """Append a segment (an empty list adds nothing)."""
        if not entries:
            return
        assert not {e.path for e in entries} & self.known, "a file is read once"
        self.segments.append(list(entries))
        self.next_offset = max([self.next_offset, *(e.offset + e.rows for e in entries if e.offset is not None)])

    def train_sizes(self, segment: int) -> list[int]:
        return [f.train for f in self.segments[segment]]

    def files_done(self, segment: int, rows_done: int) -> int:
        """Files whose training rows are all trained when ``rows_done`` rows of ``segment`` are."""
        done = sum(len(seg) for seg in self.segments[:segment])
        if segment < len(self.segments):
            left = rows_done
            for f in self.segments[segment]:
                if left < f.train:
                    break
                left -= f.train
                done += 1
        return done

    def to_dict(self) -> dict[str, Any]:
        return {"segments": [[asdict(f) for f in seg] for seg in self.segments], "next_offset": self.next_offset}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Feed:
        return cls([[FileEntry(**f) for f in seg] for seg in raw["segments"]], int(raw["next_offset"]))


class FileWaiter:
    """Waits at the end of the last segment until new files land in the followed directory.

    ``wait(feed)`` polls ``--data`` every ``poll_interval`` seconds until new files land (then a segment
    of them is added to ``feed``), or says why to stop instead: ``"signal"`` (SIGTERM/SIGINT on some
    rank) or ``"idle"`` (none for ``idle_timeout`` seconds). Every rank naps in short sleeps, so a
    signal is noticed at once, then all vote on stopping and take rank 0's listing: every rank sees the
    same files at the same step. Collective: every rank calls it at the same step.
    """

    def __init__(self, source: str, poll_interval: float, idle_timeout: float | None,
                 list_files: Callable[[str], list[FileInfo]],
                 inspect: Callable[[list[FileInfo], int], list[FileEntry]],
                 signalled: Callable[[], bool], stop_vote: Callable[[], float], on_bad_file: Callable[[], None]):
        """``list_files(source)``: the Parquet files now there; ``inspect(files, next_offset)``: their
        entries, checked and numbered; ``signalled``/``stop_vote``: this rank's signal; ``on_bad_file``:
        called before a bad file's error leaves (to save what was learnt, so that a rerun resumes here)."""
        self.source, self.poll_interval, self.idle_timeout = source, poll_interval, idle_timeout
        self._list, self._inspect = list_files, inspect
        self._signalled, self._stop_vote, self._on_bad_file = signalled, stop_vote, on_bad_file

    def _poll(self, feed: Feed, since: float) -> list[FileEntry] | None:
        """Rank 0's look at the directory: the new files' entries, [] for none yet, None when idle too long."""
        try:
            listing = self._list(self.source)
        except UserError as e:  # e.g. an object store's hiccup: the next poll tries again
            log.warning("%s; trying again in %g s", e, self.poll_interval)
            listing = []
        found = new_files(listing, feed.known)
        if found:
            return self._inspect(found, feed.next_offset)
        timeout = self.idle_timeout
        return None if timeout is not None and time.monotonic() - since >= timeout else []

    def _nap(self) -> None:
        deadline = time.monotonic() + self.poll_interval
        while not self._signalled() and time.monotonic() < deadline:
            time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))

    def wait(self, feed: Feed) -> Literal["signal", "idle"] | None:
        since, timeout = time.monotonic(), self.idle_timeout
        log.info("waiting for new files in %s%s", self.source,
                 f" (stopping after {timeout:g} s without any)" if timeout is not None else "")
        for attempt in itertools.count():
            if attempt:
                self._nap()
            if dist.allreduce_sum([self._stop_vote()], name="follow-stop")[0] > 0:
                return "signal"
            try:
                entries = dist.run_on_main(lambda: self._poll(feed, since), name="follow-poll")
            except UserError:  # a bad file: save what was learnt, so that the rerun resumes here
                self._on_bad_file()
                raise
            if entries is None:
                return "idle"
            if entries:
                feed.add(entries)
                log.info("%d new file(s), %d rows: %s", len(entries), sum(e.rows for e in entries),
                         ", ".join(os.path.basename(e.path) for e in entries[:5])
                         + (", ..." if len(entries) > 5 else ""))
                return None
        raise AssertionError("unreachable")
