"""Storage faults (dtrain/storage.py, dtrain/checkpoint.py, dtrain/coordinator.py): checked before training,
a failed checkpoint costs itself only. Real file systems: a 2 MB tmpfs fills up, a read-only one refuses."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch

from dtrain.checkpoint import Checkpointer
from dtrain.config import Config, RunConfig, UserError
from dtrain.coordinator import Coordinator
from dtrain.rundir import RunDir
from dtrain.storage import SaveRetry, StorageError, check_room, checkpoint_bytes, probe

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]


# -- the retry policy (pure) ------------------------------------------------------------------------------


def _tries(retry: SaveRetry, outcomes: list[bool], due_points: int) -> list[int]:
    """The due points (0-based) at which a save is tried, each try failing or not as ``outcomes`` says."""
    tried, results = [], iter(outcomes)
    for point in range(due_points):
        if retry.attempt():
            tried.append(point)
            if next(results, True):
                retry.succeeded(point)
            else:
                retry.failed("No space left on device")
    return tried


def test_failed_saves_are_tried_again_at_growing_intervals() -> None:
    retry = SaveRetry(max_gap=8)
    # Failing for good: tried at the next due point, then every 2nd, 4th, 8th, and no rarer than that.
    assert _tries(retry, [False] * 20, 40) == [0, 1, 3, 7, 15, 23, 31, 39]
    assert retry.report() == {"checkpoint_failures": 8, "checkpoint_error": "No space left on device",
                              "checkpoints_failing": True, "last_checkpoint_step": None}


def test_a_good_save_ends_the_streak() -> None:
    retry = SaveRetry()
    assert retry.failed("x") is True  # the first of a streak: the one warned about
    assert retry.failed("x") is False
    assert retry.succeeded(7) is True
    assert retry.attempt() and retry.next_gap() == 1
    assert retry.report()["checkpoints_failing"] is False
    assert retry.report()["last_checkpoint_step"] == 7
    assert SaveRetry().report() == {}  # nothing in the summary of a run without failures


# -- probes and room --------------------------------------------------------------------------------------


def test_probe_accepts_writable_locations_and_leaves_nothing(tmp_path: Path) -> None:
    probe(str(tmp_path / "new" / "dir"), "--run-dir")
    probe(f"file://{tmp_path}/url", "--checkpoint-dir")
    probe("memory://probe-test/checkpoints", "--checkpoint-dir")
    assert list((tmp_path / "new" / "dir").iterdir()) == [] and list((tmp_path / "url").iterdir()) == []


def test_probe_names_the_flag_and_the_reason(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(UserError, match=r"^--checkpoint-dir: cannot write to .*a-file/ck.*; choose a writable"):
        probe(str(blocker / "ck"), "--checkpoint-dir")


def test_probe_of_a_read_only_file_system(tmp_path: Path, mount_tmpfs) -> None:
    ro = mount_tmpfs(tmp_path / "ro", ro=True)
    for url in (str(ro), f"file://{ro}", str(ro / "sub")):
        with pytest.raises(UserError, match=r"Read-only file system"):
            probe(url, "--checkpoint-dir")


def test_room_for_two_checkpoints(tmp_path: Path, mount_tmpfs) -> None:
    small = mount_tmpfs(tmp_path / "small", size="2m")
    check_room(str(small / "ck"), 1 << 20, "--checkpoint-dir", "two checkpoints of this model")
    with pytest.raises(UserError, match=r"^--checkpoint-dir: .* has 2.0 MiB free, two checkpoints of this model "
                                        r"needs about 8.0 MiB; free some space"):
        check_room(str(small / "ck"), 8 << 20, "--checkpoint-dir", "two checkpoints of this model")
    check_room("memory://anything", 1 << 60, "--checkpoint-dir", "x")  # object stores: nothing to ask
    # A 1000x1000 float32 layer with Adam: the weights and two moments, plus the rest.
    assert checkpoint_bytes([4_000_000], "adam") == 12_000_000 + (64 << 10)
    assert checkpoint_bytes([4_000_000], "sgd") == 4_000_000 + (64 << 10)


# -- checkpoints on a file system that fills up ---------------------------------------------------------


def _state(n: int) -> dict[str, torch.Tensor]:
    return {"w": torch.ones(n)}


def test_a_save_that_fills_the_disk_leaves_no_partial_files(tmp_path: Path, mount_tmpfs) -> None:
    root = mount_tmpfs(tmp_path / "full", size="2m")
    ck = Checkpointer(str(root))
    ck.write(1, _state(100_000))  # 400 KB: fits
    with pytest.raises(OSError, match="No space left"):
        ck.write(2, _state(1_000_000))  # 4 MB: does not
    assert sorted(p.name for p in root.iterdir()) == ["step-00000001"]
    found = ck.latest()
    assert found is not None and torch.equal(found[1]["w"], torch.ones(100_000))


def test_stale_temporary_directories_are_swept(tmp_path: Path) -> None:
    root = tmp_path / "ck"
    ck = Checkpointer(str(root))
    ck.write(1, _state(10))
    (root / ".step-00000002.tmp-0123abcd").mkdir()
    (root / ".step-00000002.tmp-0123abcd" / "state.pt").write_bytes(b"partial")
    (root / "notes.txt").write_text("the user's")
    assert [Path(p).name for p in ck.sweep()] == [".step-00000002.tmp-0123abcd"]
    assert sorted(p.name for p in root.iterdir()) == ["notes.txt", "step-00000001"]


def test_a_missing_manifest_warns_like_a_corrupt_checkpoint(tmp_path: Path, caplog) -> None:
    ck = Checkpointer(str(tmp_path / "ck"), keep=5)
    ck.write(1, _state(10))
    path = ck.write(2, _state(20))
    os.remove(f"{path}/MANIFEST.json")
    with caplog.at_level(logging.WARNING, logger="dtrain.checkpoint"):
        found = ck.latest()
    assert found is not None and found[0].endswith("step-00000001")
    warnings = [r.getMessage() for r in caplog.records]
    assert warnings == [f"skipping checkpoint: {path}: no MANIFEST.json (incomplete or damaged)"]


# -- the coordinator: a failed save costs itself only ---------------------------------------------------


def test_failing_saves_warn_once_keep_the_last_good_one_and_are_recorded(tmp_path: Path, mount_tmpfs,
                                                                          caplog) -> None:
    root = mount_tmpfs(tmp_path / "full", size="2m")
    coord = Coordinator(Config(run=RunConfig(checkpoint_every=1)), str(root))
    big = {"w": torch.ones(200_000)}  # 800 KB: two fit, not three
    with caplog.at_level(logging.WARNING, logger="dtrain.coordinator"):
        saved = []
        for step in range(1, 12):
            if coord.due(step):
                saved.append(step)
                coord.save(step, lambda: big, {}, sync=step % 2 == 0)  # async and sync saves alike
        coord.close()
    # Steps 1 and 2 fit; 3 fails, is tried at 4, then at 6 and 10 (the interval grows).
    assert saved == [1, 2, 3, 4, 6, 10]
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"checkpoint of step 3 not written to {root} (No space left on device); "
                               "step 2's stays the latest")
    assert sorted(p.name for p in root.iterdir()) == ["step-00000001", "step-00000002"]
    assert coord.report() == {"checkpoint_failures": 4, "checkpoint_error": "No space left on device",
                              "checkpoints_failing": True, "last_checkpoint_step": 2}


def test_preflight_of_a_read_only_run_directory(tmp_path: Path, mount_tmpfs) -> None:
    ro = mount_tmpfs(tmp_path / "ro")
    (ro / "run").mkdir()  # an existing run directory ...
    mount_tmpfs.remount_ro(ro)  # ... on a mount that became read-only
    coord = Coordinator(Config(), str(ro / "run" / "checkpoints"))
    with pytest.raises(UserError, match=r"^--run-dir: cannot write to .*/run' \(Read-only file system\)"):
        coord.preflight(str(ro / "run"))


def test_the_final_model_goes_to_a_rescue_directory_named_in_one_line(tmp_path: Path, mount_tmpfs) -> None:
    full = mount_tmpfs(tmp_path / "full", size="1m")
    run = RunDir(str(full / "run"))
    (full / "filler").write_bytes(b"\0" * (1024 * 1024 - 64 * 1024))
    run.save_model({"w": torch.ones(100_000)})  # 400 KB: no room left
    run.save_summary({"steps": 3})
    with pytest.raises(StorageError) as e:
        run.close()
    message = str(e.value)
    assert "\n" not in message and "(No space left on device)" in message
    rescue = Path(message.split("the model and summary are in ")[1].split(";")[0])
    assert torch.equal(torch.load(rescue / "model.pt")["w"], torch.ones(100_000))
    assert (rescue / "summary.json").read_text().strip().endswith("}")
    assert not list((full / "run").glob(".*tmp"))


# -- how a rank ended (dtrain/supervise.py) ---------------------------------------------------------------


def test_how_a_rank_ended_is_told_only_when_the_others_need_it() -> None:
    from dtrain.supervise import describe

    killed, exited = (lambda sig: sig), (lambda code: code << 8)  # waitpid statuses
    assert describe(killed(9), forwarded=False) == "was killed by SIGKILL"
    assert describe(killed(9), forwarded=True) == "was killed by SIGKILL"  # not a signal it was sent
    assert describe(killed(15), forwarded=False) == "was killed by SIGTERM"
    assert describe(killed(15), forwarded=True) is None  # the job is being stopped
    assert describe(exited(1), forwarded=False) == "exited with status 1"
    assert describe(exited(0), forwarded=False) is None
    assert describe(exited(2), forwarded=False) is None  # bad input: every rank says so itself
    assert describe(exited(3), forwarded=False) is None  # stopped because another rank failed: not a cause
    assert describe(exited(143), forwarded=True) is None  # stopped with a checkpoint, as asked


def test_a_rank_whose_heartbeat_stood_still_is_named_with_its_host() -> None:
    from dtrain.supervise import silent, unanswered

    before = {1: "7 h2", 2: "9 h3", 3: "4 h3"}
    assert silent(before, {1: "7 h2", 2: "10 h3", 3: "5 h3"}) == [(1, "h2")]
    assert silent(before, {1: "8 h2", 3: "4 h3"}) == [(3, "h3")]  # an unreadable beat names nobody
    assert silent(before, {1: "8 h2", 2: "10 h3", 3: "5 h3"}) == []
    assert unanswered([(1, "h2")]) == ("rank 1 on h2 stopped answering (network unreachable or host down); "
                                       "rerun the same command once h2 is back")
    assert unanswered([(2, "h3"), (3, "h3")]).endswith("rank 2 on h3, rank 3 on h3 stopped answering "
                                                       "(network unreachable or host down); rerun the same "
                                                       "command once h3 is back")
    assert unanswered([(1, "h2"), (2, "h3")]).endswith("once h2 and h3 are back")


def test_a_survivor_names_the_rank_that_stopped_beating_in_horovods_store(monkeypatch) -> None:
    """horovodrun's own key-value store; rank 2's parent beats (a real heartbeat in a process of its
    own), rank 1's beat stood still as a partitioned host's does: rank 1 is the one named."""
    import subprocess
    import sys

    from horovod.runner.http.http_server import KVStoreServer

    from dtrain import supervise

    server = KVStoreServer(verbose=0)
    port = server.start_server()
    env = {"HOROVOD_GLOO_RENDEZVOUS_ADDR": "127.0.0.1", "HOROVOD_GLOO_RENDEZVOUS_PORT": str(port)}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    beating = subprocess.Popen([sys.executable, "-c", "from dtrain.supervise import _beat; _beat(2)"],
                               env={**os.environ, **env, "HOROVOD_HOSTNAME": "h3"})
    try:
        supervise._put("beat-1", "12 h2")
        found = supervise.peer_end(0, 3)
        assert found == (supervise.unanswered([(1, "h2")]), True)
        supervise.record(1, "rank 1 on h2 was killed by SIGKILL")  # a recorded end comes first
        assert supervise.peer_end(0, 3) == ("rank 1 on h2 was killed by SIGKILL", False)
    finally:
        beating.kill()
        beating.wait()
        server.shutdown_server()
