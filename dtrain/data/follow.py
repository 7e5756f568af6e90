"""Following a directory for new Parquet files (``--follow``): which files are new, in which order, and
where training stands among them. Pure logic, no I/O: the listing comes from ``dtrain.data`` and the
polling (with its collectives) from ``dtrain.engine``.

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

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any


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
