"""Checkpoints (dtrain/checkpoint.py): complete and verified, or ignored. Local disk and fsspec memory://."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
import pytest
import torch
from torch import nn

from dtrain.checkpoint import FORMAT_VERSION, Checkpointer, CheckpointError, model_sha256, snapshot

pytestmark = pytest.mark.unit


def _clear_memory_fs() -> None:
    fs = fsspec.filesystem("memory")
    fs.store.clear()
    fs.pseudo_dirs.clear()
    fs.pseudo_dirs.append("")


@pytest.fixture(params=["local", "memory"])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A checkpoint root on local disk or on fsspec's in-memory file system (emptied around each test)."""
    if request.param == "local":
        yield str(tmp_path / "run" / "checkpoints")
        return
    _clear_memory_fs()
    yield f"memory://ckpt-{uuid.uuid4().hex[:8]}/checkpoints"
    _clear_memory_fs()


def make_state(step: int) -> dict[str, Any]:
    torch.manual_seed(step)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    return {
        "model": model.state_dict(),
        "optimizer": {"lr": 0.1 * (step + 1), "momentum_buffer": [torch.full((3,), float(step))]},
        "position": {"epoch": step // 10, "step": step % 10},
        "step": step,
    }


def assert_same_state(got: Any, want: Any) -> None:
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor)
        assert got.dtype == want.dtype
        assert torch.equal(got, want.detach().cpu())
    elif isinstance(want, dict):
        assert isinstance(got, dict)
        assert set(got) == set(want)
        for k in want:
            assert_same_state(got[k], want[k])
    elif isinstance(want, list | tuple):
        assert type(got) is type(want)
        assert len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            assert_same_state(g, w)
    else:
        assert got == want


def read_bytes(ck: Checkpointer, path: str) -> bytes:
    with ck.fs.open(path, "rb") as f:
        data: bytes = f.read()
    return data


def write_bytes(ck: Checkpointer, path: str, data: bytes) -> None:
    with ck.fs.open(path, "wb") as f:
        f.write(data)


def names(ck: Checkpointer) -> list[str]:
    return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in ck.fs.ls(ck.root, detail=False))


# -- writing, listing, loading ----------------------------------------------------------------------------


def test_empty_or_missing_root(root: str) -> None:
    ck = Checkpointer(root)
    assert ck.list() == []
    assert ck.latest() is None


def test_write_list_latest_round_trip(root: str) -> None:
    ck = Checkpointer(root, keep=5)
    state = make_state(120)
    path = ck.write(120, state, meta={"epoch": 12, "world_size": 2})
    assert path.rstrip("/").endswith("step-00000120")
    assert ck.list() == [(120, path)]

    manifest = json.loads(read_bytes(ck, f"{path}/MANIFEST.json"))
    assert manifest["format"] == FORMAT_VERSION
    assert manifest["step"] == 120
    assert manifest["bytes"] == len(read_bytes(ck, f"{path}/state.pt"))
    assert len(manifest["sha256"]) == 64
    assert manifest["epoch"] == 12
    assert manifest["world_size"] == 2

    found = ck.latest()
    assert found is not None
    found_path, loaded = found
    assert found_path == path
    assert_same_state(loaded, state)
    assert_same_state(ck.load_path(path), state)

    # A new Checkpointer (a restarted process) finds the same checkpoint.
    again = Checkpointer(root)
    assert again.list() == [(120, path)]
    found_again = again.latest()
    assert found_again is not None
    assert_same_state(found_again[1], state)


def test_list_is_ordered_by_step_and_latest_is_the_highest(root: str) -> None:
    ck = Checkpointer(root, keep=10)
    paths = {step: ck.write(step, make_state(step)) for step in (7, 50, 300, 100_000_000)}
    assert ck.list() == [(s, paths[s]) for s in sorted(paths)]
    found = ck.latest()
    assert found is not None
    assert found[0] == paths[100_000_000]
    assert found[1]["step"] == 100_000_000


def test_writing_an_earlier_step_drops_the_abandoned_later_ones(root: str) -> None:
    """A run resumed from step 50 continues a new timeline: a later --resume auto must not pick 300."""
    ck = Checkpointer(root, keep=10)
    for step in (7, 50, 300):
        ck.write(step, make_state(step))
    path = ck.write(60, make_state(60))
    assert [step for step, _ in ck.list()] == [7, 50, 60]
    found = ck.latest()
    assert found is not None and found[0] == path


def test_resaving_a_step_replaces_it(root: str) -> None:
    ck = Checkpointer(root)
    ck.write(5, make_state(1))
    path = ck.write(5, make_state(2))
    assert ck.list() == [(5, path)]
    assert_same_state(ck.load_path(path), make_state(2))


@pytest.mark.parametrize("keep", [1, 2, 3])
def test_keep_prunes_the_oldest(root: str, keep: int) -> None:
    ck = Checkpointer(root, keep=keep)
    for step in range(0, 60, 10):
        ck.write(step, make_state(step))
    expected_steps = list(range(0, 60, 10))[-keep:]
    assert [s for s, _ in ck.list()] == expected_steps
    # Pruned directories are gone from storage, not just hidden.
    assert names(ck) == [f"step-{s:08d}" for s in expected_steps]
    found = ck.latest()
    assert found is not None
    assert found[1]["step"] == 50


# -- corrupt and incomplete checkpoints -------------------------------------------------------------------


def truncate(ck: Checkpointer, path: str) -> None:
    data = read_bytes(ck, f"{path}/state.pt")
    write_bytes(ck, f"{path}/state.pt", data[: len(data) // 2])


def flip_bit(ck: Checkpointer, path: str) -> None:
    data = bytearray(read_bytes(ck, f"{path}/state.pt"))
    data[len(data) // 2] ^= 0x10
    write_bytes(ck, f"{path}/state.pt", bytes(data))


@pytest.mark.parametrize("damage", [truncate, flip_bit], ids=["truncated", "bit-flipped"])
def test_corrupt_state_is_detected_and_skipped(
    root: str, damage: Any, caplog: pytest.LogCaptureFixture
) -> None:
    ck = Checkpointer(root, keep=5)
    good = ck.write(10, make_state(10))
    bad = ck.write(20, make_state(20))
    damage(ck, bad)

    with pytest.raises(CheckpointError, match="checksum mismatch"):
        ck.load_path(bad)
    assert_same_state(ck.load_path(good), make_state(10))

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dtrain.checkpoint"):
        found = ck.latest()
    assert found is not None
    assert found[0] == good
    assert_same_state(found[1], make_state(10))
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "skipping checkpoint" in warnings[0].getMessage()
    assert "step-00000020" in warnings[0].getMessage()


def test_every_checkpoint_corrupt_gives_none(root: str, caplog: pytest.LogCaptureFixture) -> None:
    ck = Checkpointer(root, keep=5)
    for step in (1, 2):
        flip_bit(ck, ck.write(step, make_state(step)))
    with caplog.at_level(logging.WARNING, logger="dtrain.checkpoint"):
        assert ck.latest() is None
    assert len([r for r in caplog.records if "skipping checkpoint" in r.getMessage()]) == 2


@pytest.mark.parametrize(
    "manifest",
    [b"{not json", b'{"format": 1, "step": 20}', b""],
    ids=["garbled", "no-checksum", "empty"],
)
def test_bad_manifest_is_detected_and_skipped(root: str, manifest: bytes) -> None:
    ck = Checkpointer(root, keep=5)
    good = ck.write(10, make_state(10))
    bad = ck.write(20, make_state(20))
    write_bytes(ck, f"{bad}/MANIFEST.json", manifest)
    with pytest.raises(CheckpointError):
        ck.load_path(bad)
    found = ck.latest()
    assert found is not None
    assert found[0] == good


def test_missing_state_file_is_detected(root: str) -> None:
    ck = Checkpointer(root, keep=5)
    good = ck.write(10, make_state(10))
    bad = ck.write(20, make_state(20))
    ck.fs.rm(f"{bad}/state.pt")
    with pytest.raises(CheckpointError, match="unreadable"):
        ck.load_path(bad)
    found = ck.latest()
    assert found is not None
    assert found[0] == good


def test_pruning_never_removes_the_checkpoint_just_written(root: str) -> None:
    # Resume skipped a corrupt step-200 and continued from step 100; the next save (step 150) must be
    # what a later resume finds, not be pruned in favour of the corrupt newer-numbered directory.
    setup = Checkpointer(root, keep=5)
    setup.write(100, make_state(100))
    flip_bit(setup, setup.write(200, make_state(200)))

    ck = Checkpointer(root, keep=1)
    found = ck.latest()  # what a resume picks
    assert found is not None and found[1]["step"] == 100

    path = ck.write(150, make_state(150))
    assert ck.fs.exists(f"{path}/MANIFEST.json"), "write() returned a checkpoint it had already pruned"
    found = ck.latest()
    assert found is not None, "the only good checkpoint was pruned, a corrupt one kept"
    assert found[1]["step"] == 150


def test_directory_without_manifest_is_ignored(root: str) -> None:
    # A crash after state.pt was written but before the manifest (the commit marker).
    ck = Checkpointer(root, keep=5)
    good = ck.write(10, make_state(10))
    crashed = f"{ck.root.rstrip('/')}/step-00000020"
    ck.fs.makedirs(crashed, exist_ok=True)
    write_bytes(ck, f"{crashed}/state.pt", read_bytes(ck, f"{good}/state.pt"))
    assert ck.list() == [(10, good)]
    found = ck.latest()
    assert found is not None
    assert found[0] == good


def test_leftover_temporary_directory_is_ignored(root: str) -> None:
    # A crash before the rename of a local save leaves ".step-…tmp-…", complete or not.
    ck = Checkpointer(root, keep=5)
    good = ck.write(10, make_state(10))
    newer = make_state(30)
    other = Checkpointer(root + "-elsewhere")
    src = other.write(30, newer)
    tmp = f"{ck.root.rstrip('/')}/.step-00000030.tmp-deadbeef"
    ck.fs.makedirs(tmp, exist_ok=True)
    for name in ("state.pt", "MANIFEST.json"):
        write_bytes(ck, f"{tmp}/{name}", read_bytes(other, f"{src}/{name}"))
    assert ck.load_path(tmp)["step"] == 30  # a valid checkpoint, but never committed
    assert ck.list() == [(10, good)]
    found = ck.latest()
    assert found is not None
    assert found[0] == good


def test_unrelated_entries_are_ignored(root: str) -> None:
    ck = Checkpointer(root, keep=5)
    good = ck.write(10, make_state(10))
    base = ck.root.rstrip("/")
    for name in ("step-12", "step-0000002x", "notes", "step-00000040.old"):
        ck.fs.makedirs(f"{base}/{name}", exist_ok=True)
        write_bytes(ck, f"{base}/{name}/MANIFEST.json", b"{}")
    assert ck.list() == [(10, good)]


def test_local_save_leaves_no_temporary_directory(tmp_path: Path) -> None:
    root = tmp_path / "ckpts"
    ck = Checkpointer(str(root), keep=2)
    for step in range(4):
        ck.write(step, make_state(step))
    assert sorted(p.name for p in root.iterdir()) == ["step-00000002", "step-00000003"]
    assert sorted(p.name for p in (root / "step-00000003").iterdir()) == ["MANIFEST.json", "state.pt"]


# -- asynchronous saves -----------------------------------------------------------------------------------


def test_save_async_then_wait_writes(root: str) -> None:
    ck = Checkpointer(root, keep=5)
    state = make_state(3)
    ck.save_async(3, state, meta={"epoch": 0})
    ck.wait()
    assert [s for s, _ in ck.list()] == [3]
    found = ck.latest()
    assert found is not None
    assert_same_state(found[1], state)
    assert ck.last_write_seconds > 0
    assert ck.last_block_seconds >= 0
    ck.wait()  # nothing in flight: a no-op


def test_save_async_writes_the_state_as_it_was(root: str) -> None:
    ck = Checkpointer(root, keep=5)
    weight = torch.zeros(1000)
    state = {"model": {"w": weight}, "step": 1}
    ck.save_async(1, state)
    weight.add_(1.0)  # training goes on while the write is in flight
    state["step"] = 2
    ck.wait()
    found = ck.latest()
    assert found is not None
    assert torch.equal(found[1]["model"]["w"], torch.zeros(1000))
    assert found[1]["step"] == 1


def test_deferred_tensors_are_copied_off_the_loop_and_fenced(root: str) -> None:
    ck = Checkpointer(root, keep=5)
    weight, running = torch.zeros(2_000_000), torch.zeros(10)  # a parameter, a batch-norm buffer
    state = {"model": {"w": weight, "running": running}}
    ck.save_async(1, state, defer=lambda t: t.data_ptr() == weight.data_ptr())
    running.add_(1.0)  # the next forward pass updates buffers at once: they were copied already
    ck.fence()  # before the next optimizer step
    weight.add_(1.0)
    ck.wait()
    found = ck.latest()
    assert found is not None
    assert torch.equal(found[1]["model"]["w"], torch.zeros(2_000_000))
    assert torch.equal(found[1]["model"]["running"], torch.zeros(10))
    ck.fence()  # nothing deferred in flight: returns at once


def test_a_failed_deferred_copy_releases_the_fence_and_is_reported(root: str) -> None:
    ck = Checkpointer(root, keep=5)
    # A deferred tensor whose buffer cannot take it (a meta tensor has no data): the copy fails.
    ck.save_async(1, {"w": torch.empty(3, device="meta")}, defer=lambda t: True)
    ck.fence()
    with pytest.raises(CheckpointError):
        ck.wait()


def test_consecutive_async_saves(root: str) -> None:
    ck = Checkpointer(root, keep=2)
    for step in range(5):
        ck.save_async(step, make_state(step))
    ck.wait()
    assert [s for s, _ in ck.list()] == [3, 4]
    found = ck.latest()
    assert found is not None
    assert_same_state(found[1], make_state(4))


def test_failed_async_write_raises_on_wait(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a regular file")
    ck = Checkpointer(str(blocker / "checkpoints"))
    ck.save_async(1, make_state(1))
    with pytest.raises(CheckpointError, match="checkpoint write failed"):
        ck.wait()
    ck.wait()  # the error is reported once
    assert blocker.read_text() == "a regular file"


def test_failed_async_write_is_reported_by_the_next_save(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    ck = Checkpointer(str(blocker / "checkpoints"))
    ck.save_async(1, make_state(1))
    with pytest.raises(CheckpointError):
        ck.save_async(2, make_state(2))


# -- model_sha256 -----------------------------------------------------------------------------------------


def linear_state(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return dict(nn.Linear(5, 3).state_dict())


def test_model_sha256_is_stable_for_equal_states() -> None:
    a = linear_state()
    digest = model_sha256(a)
    assert len(digest) == 64
    int(digest, 16)
    assert model_sha256(linear_state()) == digest
    assert model_sha256({k: v.clone() for k, v in a.items()}) == digest
    assert model_sha256(snapshot(a)) == digest
    assert model_sha256(dict(reversed(list(a.items())))) == digest  # insertion order does not matter


def test_model_sha256_ignores_memory_layout() -> None:
    w = torch.randn(6, 4)
    transposed = w.t().contiguous().t()  # same values, column-major strides
    assert not transposed.is_contiguous()
    assert torch.equal(transposed, w)
    strided = torch.randn(6, 8)[:, ::2]
    assert not strided.is_contiguous()
    assert model_sha256({"w": w, "s": strided}) == model_sha256({"w": transposed, "s": strided.clone()})


def test_model_sha256_ignores_requires_grad() -> None:
    model = nn.Linear(3, 2)
    params = dict(model.named_parameters())
    assert all(p.requires_grad for p in params.values())
    assert model_sha256(params) == model_sha256(model.state_dict())


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda s: s["weight"].view(-1)[7].add_(1e-6), id="one-value"),
        pytest.param(lambda s: s["bias"].neg_(), id="sign"),
        pytest.param(lambda s: s.update(weight=s["weight"].to(torch.float64)), id="dtype"),
        pytest.param(lambda s: s.update(weight=s["weight"].reshape(5, 3)), id="shape"),
        pytest.param(lambda s: s.update(renamed=s.pop("bias")), id="name"),
        pytest.param(lambda s: s.pop("bias"), id="missing-entry"),
    ],
)
def test_model_sha256_changes_with_the_model(change: Any) -> None:
    state = {k: v.clone() for k, v in linear_state().items()}
    before = model_sha256(state)
    change(state)
    assert model_sha256(state) != before


def test_model_sha256_of_various_dtypes_and_empty_tensors() -> None:
    state = {
        "half": torch.arange(6, dtype=torch.float16),
        "bf16": torch.arange(6, dtype=torch.bfloat16),
        "mask": torch.tensor([True, False, True]),
        "idx": torch.arange(4, dtype=torch.int64),
        "empty": torch.empty(0, 3),
    }
    digest = model_sha256(state)
    assert model_sha256({k: v.clone() for k, v in state.items()}) == digest
    assert model_sha256({**state, "empty": torch.empty(0, 4)}) != digest


def test_model_sha256_handles_scalar_buffers() -> None:
    # BatchNorm keeps a 0-dim ``num_batches_tracked`` buffer; a model that has one must hash too.
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    state = model.state_dict()
    assert state["1.num_batches_tracked"].dim() == 0
    digest = model_sha256(state)
    assert model_sha256({k: v.clone() for k, v in state.items()}) == digest
    model.train()
    model(torch.randn(8, 4))  # updates the running stats and the counter
    assert model_sha256(model.state_dict()) != digest
    assert model_sha256({"x": torch.tensor(1.0)}) != model_sha256({"x": torch.tensor(2.0)})


# -- snapshot ---------------------------------------------------------------------------------------------


def test_snapshot_is_a_deep_copy() -> None:
    w = torch.randn(3, 3, requires_grad=True)
    buf = torch.zeros(2)
    nested: dict[str, Any] = {
        "model": {"w": w, "buf": buf},
        "opt": [{"m": torch.ones(2)}, ("a", torch.arange(3))],
        "step": 7,
        "name": "run",
        "none": None,
    }
    snap = snapshot(nested)
    assert_same_state(snap, {
        "model": {"w": w.detach(), "buf": buf},
        "opt": [{"m": torch.ones(2)}, ("a", torch.arange(3))],
        "step": 7,
        "name": "run",
        "none": None,
    })
    assert isinstance(snap["opt"], list)
    assert isinstance(snap["opt"][1], tuple)
    assert snap["model"]["w"].requires_grad is False
    assert snap["model"]["w"].device.type == "cpu"

    # Mutating the originals afterwards leaves the snapshot as it was.
    with torch.no_grad():
        w.add_(1.0)
    buf.fill_(5.0)
    nested["opt"][0]["m"].mul_(3.0)
    nested["opt"][1][1].zero_()
    nested["model"]["new"] = torch.ones(1)
    nested["step"] = 8
    assert not torch.equal(snap["model"]["w"], w.detach())
    assert torch.equal(snap["model"]["buf"], torch.zeros(2))
    assert torch.equal(snap["opt"][0]["m"], torch.ones(2))
    assert torch.equal(snap["opt"][1][1], torch.arange(3))
    assert "new" not in snap["model"]
    assert snap["step"] == 7


def test_snapshot_does_not_share_storage() -> None:
    t = torch.randn(4)
    view = t[1:3]
    snap = snapshot({"t": t, "view": view})
    assert snap["t"].data_ptr() != t.data_ptr()
    assert snap["view"].untyped_storage().data_ptr() != t.untyped_storage().data_ptr()
    assert torch.equal(snap["view"], view)
