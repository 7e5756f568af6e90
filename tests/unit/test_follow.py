"""--follow's pure logic (dtrain/data/follow.py), the row limit of --max-samples (dtrain/data/plan.py) and the
configuration checks of both: no cluster, no files."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dtrain import cli
from dtrain.config import Config, ConfigError, DataConfig, TrainConfig
from dtrain.data.follow import Feed, FileEntry, FileInfo, FileWaiter, arrival_order, ignored, new_files, number_rows
from dtrain.data.plan import EpochPlan, Position, limited, steps_for_samples
from dtrain.errors import UserError

pytestmark = pytest.mark.unit


def entry(path: str, train: int, val: int = 0, offset: int | None = 0) -> FileEntry:
    return FileEntry(path, 0.0, 1, train + val, train, val, offset)


# -- which files are new, in which order --------------------------------------------------------------


@pytest.mark.parametrize(
    ("relative", "skip"),
    [("part-0.parquet", False), ("day=1/part-0.parquet", False), ("_tmp-part.parquet", True),
     (".part.parquet.crc", True), ("_temporary/0/part-0.parquet", True), (".hidden/part.parquet", True),
     ("/a_b/part_1.parquet", False)],
)
def test_names_starting_with_dot_or_underscore_are_ignored(relative: str, skip: bool) -> None:
    assert ignored(relative) is skip


def test_arrival_order_is_mtime_then_name() -> None:
    files = [FileInfo("b", 2.0, 1), FileInfo("c", 1.0, 1), FileInfo("a", 2.0, 1), FileInfo("d", 0.5, 1)]
    assert [f.path for f in arrival_order(files)] == ["d", "c", "a", "b"]


def test_new_files_skip_known_ones_even_when_touched_again() -> None:
    listing = [FileInfo("old", 99.0, 1), FileInfo("new2", 5.0, 1), FileInfo("new1", 4.0, 1)]
    assert [f.path for f in new_files(listing, {"old"})] == ["new1", "new2"]
    assert new_files(listing, {"old", "new1", "new2"}) == []


@settings(deadline=None)
@given(st.lists(st.tuples(st.sampled_from("abcdef"), st.integers(0, 3)), max_size=12))
def test_new_files_is_a_deterministic_total_order(raw: list[tuple[str, int]]) -> None:
    listing = list({p: FileInfo(p, float(t), 1) for p, t in raw}.values())
    once = new_files(listing, set())
    assert once == new_files(list(reversed(listing)), set())  # the listing's own order does not matter
    assert sorted(f.path for f in once) == sorted(f.path for f in listing)


def test_number_rows_continues_after_the_last_file() -> None:
    assert number_rows([3, 0, 5], 10) == [10, 13, 13]


# -- the feed: segments, position, checkpoint round trip ------------------------------------------------


def test_feed_segments_offsets_and_files_done() -> None:
    feed = Feed()
    feed.add([entry("a", 4, 1, 0), entry("b", 3, 0, 5)])
    feed.add([])  # a poll that found nothing adds no segment
    feed.add([entry("c", 2, 0, 8)])
    assert len(feed.segments) == 2 and feed.next_offset == 10 and feed.num_files == 3
    assert feed.known == {"a", "b", "c"}
    assert feed.train_sizes(0) == [4, 3]
    # Position (segment, rows trained in it) -> files whose training rows are all done.
    assert feed.files_done(0, 0) == 0
    assert feed.files_done(0, 3) == 0
    assert feed.files_done(0, 4) == 1
    assert feed.files_done(0, 7) == 2
    assert feed.files_done(1, 1) == 2
    assert feed.files_done(2, 0) == 3  # waiting for the next segment: everything done
    with pytest.raises(AssertionError):
        feed.add([entry("b", 1)])  # a file is never read twice


def test_feed_round_trips_through_a_checkpoint_dict() -> None:
    feed = Feed()
    feed.add([entry("s3://bucket/x/a.parquet", 4, 1, None)])
    feed.add([entry("s3://bucket/x/b.parquet", 2, 0, None)])
    again = Feed.from_dict(feed.to_dict())
    assert again == feed
    assert again.next_offset == 0  # files with their own row ids are not numbered


# -- --max-samples: the plan's row limit ------------------------------------------------------------------


def trained_rows(plan: EpochPlan, start: int | None = None) -> list[int]:
    return [int(r) for s in plan.steps(start) for r in plan.global_batch(s)]


@settings(deadline=None)
@given(sizes=st.lists(st.integers(0, 30), min_size=1, max_size=5), batch=st.integers(1, 9),
       start=st.integers(0, 10), left=st.integers(0, 120), drop_last=st.booleans())
def test_limited_plan_trains_exactly_the_rows_left(sizes: list[int], batch: int, start: int, left: int,
                                                   drop_last: bool) -> None:
    plan = EpochPlan(tuple(sizes), batch, shuffle=False, drop_last=drop_last)
    start = min(start, plan.num_steps)
    rest = EpochPlan.at(Position(0, start, min(start * batch, plan.num_rows)), tuple(sizes), batch, shuffle=False,
                        drop_last=drop_last)
    cut = limited(rest, left)
    rows = trained_rows(cut)
    assert rows == trained_rows(plan, start)[: len(rows)]  # a prefix of the uncut epoch, same order
    assert len(rows) == min(left, len(trained_rows(plan, start)))
    assert limited(rest, None) is rest


def test_limited_never_trains_the_tail_drop_last_leaves_out() -> None:
    plan = EpochPlan((100,), 32, shuffle=False, drop_last=True)  # 3 steps, 96 rows; 4 dropped
    assert plan.trained_rows == 96
    assert limited(plan, 98) is plan  # more than the epoch trains: nothing to cut
    cut = limited(plan, 90)
    assert cut.num_steps == 3 and cut.trained_rows == 90


def test_steps_for_samples() -> None:
    plan = EpochPlan((10, 10), 4)  # 5 steps of 4 rows per epoch
    assert steps_for_samples(plan, 3, None) == 15
    assert steps_for_samples(plan, 3, 9) == 3
    assert steps_for_samples(plan, 3, 20) == 5
    assert steps_for_samples(plan, 3, 21) == 6
    assert steps_for_samples(plan, 3, 10**6) == 15
    drop = EpochPlan((10, 10), 6, drop_last=True)  # 3 steps of 6 rows: 18 rows per epoch
    assert steps_for_samples(drop, 2, 19) == 4
    assert steps_for_samples(EpochPlan((0,), 4), 2, 5) == 0


# -- configuration ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--follow", "--data", "d"], "--follow"),  # minibatch mode
        (["--follow", "--mode", "online"], "--follow"),  # generated data
        (["--follow", "--mode", "online", "--data", "d", "--format", "csv"], "--follow"),
        (["--idle-timeout", "5"], "--idle-timeout"),
        (["--follow", "--mode", "online", "--data", "d", "--schedule", "cosine"], "--schedule"),
        (["--poll-interval", "0"], "--poll-interval"),
        (["--max-samples", "0"], "--max-samples"),
    ],
)
def test_bad_follow_flags_are_one_line_config_errors(argv: list[str], flag: str) -> None:
    with pytest.raises(ConfigError) as info:
        cli.parse_config(argv)
    assert str(info.value).startswith(flag + ":") and "\n" not in str(info.value)


def test_follow_flags_parse() -> None:
    cfg = cli.parse_config(["--follow", "--mode", "online", "--data", "d", "--idle-timeout", "30",
                            "--poll-interval", "0.5", "--max-samples", "1000", "--schedule", "cosine",
                            "--max-steps", "100"])
    assert cfg.data.follow and cfg.data.idle_timeout == 30.0 and cfg.data.poll_interval == 0.5
    assert cfg.train.max_samples == 1000
    raw: dict[str, Any] = cfg.to_dict()
    assert Config.from_dict(raw) == cfg
    assert Config(data=DataConfig(), train=TrainConfig(max_samples=5)).train.max_samples == 5


# -- waiting for new files (FileWaiter, in one process) ---------------------------------------------------


def _waiter(listings: list[list[FileInfo]], idle: float | None = None, signalled: bool = False,
            bad: bool = False) -> tuple[FileWaiter, list[str]]:
    calls: list[str] = []

    def list_files(source: str) -> list[FileInfo]:
        calls.append("list")
        return listings.pop(0) if listings else []

    def inspect(files: list[FileInfo], next_offset: int) -> list[FileEntry]:
        if bad:
            raise UserError("--follow: bad file; fix it")
        return [entry(f.path, 10, offset=next_offset + 10 * i) for i, f in enumerate(files)]

    waiter = FileWaiter("dir", 0.01, idle, list_files, inspect, lambda: signalled,
                        lambda: 1.0 if signalled else 0.0, lambda: calls.append("checkpoint"))
    return waiter, calls


def test_waiter_adds_a_segment_of_the_new_files_only() -> None:
    feed = Feed()
    feed.add([entry("a", 10)])
    waiter, calls = _waiter([[FileInfo("a", 1.0, 1)], [FileInfo("a", 1.0, 1), FileInfo("b", 2.0, 1)]])
    assert waiter.wait(feed) is None
    assert [[e.path for e in seg] for seg in feed.segments] == [["a"], ["b"]]
    assert calls == ["list", "list"]


def test_waiter_stops_when_idle_or_signalled_and_saves_before_a_bad_file_error() -> None:
    assert _waiter([], idle=0.0)[0].wait(Feed()) == "idle"
    waiter, calls = _waiter([[FileInfo("b", 2.0, 1)]], signalled=True)
    assert waiter.wait(Feed()) == "signal" and calls == []  # the vote comes before any listing
    waiter, calls = _waiter([[FileInfo("b", 2.0, 1)]], bad=True)
    with pytest.raises(UserError, match="bad file"):
        waiter.wait(Feed())
    assert calls == ["list", "checkpoint"]
