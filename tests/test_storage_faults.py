"""Storage faults in real runs (issue 23): a read-only or full location is one line, never lost work.

Real file systems (a read-only tmpfs, a 2 MB tmpfs that fills up), real dtrain processes and horovodrun.
The guarantee checked in each: no good checkpoint lost, nothing half-written read back, the work done
before the fault saved or still training, and what the user sees counted line by line.
"""

from __future__ import annotations

import re

import pytest

from dtrain.checkpoint import Checkpointer

SMALL = ["--gen-rows", "3000", "--gen-partitions", "4", "--epochs", "1"]
_NOISE = re.compile(r"Traceback|WARNING|ERROR|dtrain: error")


def problems(output: str, ranks_only: bool = False) -> list[str]:
    """The lines a user reads as trouble: warnings, errors and tracebacks (INFO progress aside).
    ``ranks_only``: the ranks' lines, without horovodrun's own report of a rank's non-zero exit."""
    return [line for line in output.splitlines()
            if _NOISE.search(line) and (not ranks_only or line.startswith("["))]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("as_url", [False, True], ids=["path", "file-url"])
def test_read_only_checkpoint_dir_is_one_line_before_any_data_is_read(dtrain_local, tmp_path, mount_tmpfs, as_url):
    ro = mount_tmpfs(tmp_path / "ro", ro=True)
    where = f"file://{ro}/ck" if as_url else str(ro / "ck")
    res = dtrain_local([*SMALL, "--checkpoint-dir", where])
    assert res.returncode == 2, res.output[-3000:]
    assert problems(res.output) == [f"dtrain: error: --checkpoint-dir: cannot write to {where!r} (Read-only file "
                                    "system); choose a writable location with --checkpoint-dir or make this one "
                                    "writable"]
    assert res.run_dir is not None and not (res.run_dir / "stats.json").exists()  # no data was read


@pytest.mark.timeout(120)
def test_existing_run_dir_on_a_read_only_mount_is_one_line(dtrain_local, tmp_path, mount_tmpfs):
    mnt = mount_tmpfs(tmp_path / "mnt")
    (mnt / "run").mkdir()
    mount_tmpfs.remount_ro(mnt)
    res = dtrain_local(SMALL, run_dir=mnt / "run")
    assert res.returncode == 2, res.output[-3000:]
    lines = problems(res.output)
    assert len(lines) == 1 and lines[0].startswith("dtrain: error: --run-dir: cannot write to"), res.output[-3000:]
    assert "(Read-only file system)" in lines[0]


@pytest.mark.timeout(120)
def test_no_room_for_two_checkpoints_is_one_line_before_training(dtrain_local, tmp_path, mount_tmpfs):
    small = mount_tmpfs(tmp_path / "small", size="1m")
    # A 512-wide MLP with Adam: ~3.5 MB a checkpoint, where 1 MB is free.
    res = dtrain_local([*SMALL, "--hidden", "512,512", "--optimizer", "adam", "--checkpoint-dir", str(small)])
    assert res.returncode == 2, res.output[-3000:]
    lines = problems(res.output)
    assert len(lines) == 1, res.output[-3000:]
    assert re.match(r"dtrain: error: --checkpoint-dir: .* has 1\.0 MiB free, two checkpoints of this model needs "
                    r"about \d+\.\d MiB; free some space", lines[0])
    assert res.run_dir is not None and not (res.run_dir / "metrics.jsonl").exists()  # no step was trained


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_disk_filling_during_async_saves_warns_once_and_training_goes_on(horovodrun, tmp_path, mount_tmpfs):
    full = mount_tmpfs(tmp_path / "full", size="2m")
    stale = full / ".step-00000001.tmp-0badc0de"  # a crashed run's half-written checkpoint
    stale.mkdir()
    (stale / "state.pt").write_bytes(b"\0" * 100_000)
    # ~630 KB a checkpoint (a 192-wide MLP with momentum): three fit in 2 MB once the leftover is swept, and
    # the fourth (written before the oldest is pruned) fills the disk: at step 20, as training goes on.
    args = [*SMALL, "--gen-features", "64", "--hidden", "192,192", "--momentum", "0.9", "--global-batch-size", "64",
            "--checkpoint-every", "5", "--checkpoint-dir", str(full)]
    res = horovodrun(args, timeout=240)
    assert res.returncode == 0, res.output[-5000:]
    summary = res.summary()
    assert summary["steps"] == 42 and summary["checkpoints_failing"] is True
    # Steps 20 and 25 fail, 30 is passed over, 35 fails, 40 is passed over, the final save (42) fails.
    assert summary["last_checkpoint_step"] == 15 and summary["checkpoint_failures"] == 4
    assert summary["checkpoint_error"] == "No space left on device"
    assert (res.run_dir / "model.pt").exists()  # the final save failed: the model still reached the user
    # The good checkpoints stay, nothing half-written is left, nothing half-written is read back.
    assert sorted(p.name for p in full.iterdir()) == ["step-00000005", "step-00000010", "step-00000015"]
    found = Checkpointer(str(full)).latest()
    assert found is not None and found[1]["global_step"] == 15
    lines = problems(res.output)
    assert len(lines) == 2, lines  # the swept leftover, one warning for the failing saves
    assert "removed" in lines[0] and "half-written" in lines[0]
    assert "checkpoint of step 20 not written to" in lines[1] and "(No space left on device)" in lines[1]
    assert "step 15's stays the latest" in lines[1]
    # Rerun on the same full disk: refused in one line before training (before, it failed the same way again).
    again = horovodrun(args, timeout=240)
    assert again.returncode != 0
    lines = problems(again.output, ranks_only=True)
    assert len(lines) == 1 and "dtrain: error: --checkpoint-dir:" in lines[0] and "free some space" in lines[0]
    assert sorted(p.name for p in full.iterdir()) == ["step-00000005", "step-00000010", "step-00000015"]
