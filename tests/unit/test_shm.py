"""dtrain.shm's allreduce between real processes on this host (no Horovod: a file-based allgather)."""

from __future__ import annotations

import itertools
import multiprocessing
import os
import pickle
from pathlib import Path

import pytest
import torch

from dtrain import shm

from shm_ranks import group as _group, run as _run  # isort: skip

pytestmark = [pytest.mark.unit, pytest.mark.timeout(120),
              pytest.mark.skipif(not shm.supported(), reason="shared-memory allreduce needs x86-64 Linux")]


def _value(rank: int, numel: int, dtype: torch.dtype, call: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * call + rank)
    if dtype.is_floating_point:
        return torch.randn(numel, generator=g).to(dtype)
    return torch.randint(-1000, 1000, (numel,), generator=g, dtype=dtype)


def _sums(rank: int, size: int, directory: str, out) -> None:
    torch.set_num_threads(1)
    group = _group(Path(directory), rank, size)
    results = []
    # Buffers allocated in shared memory (reduced in place) and ordinary tensors (staged), sizes that
    # do not divide by the world, fewer elements than ranks, several calls, a new size under one key.
    zero_copy = group.alloc(10_001)
    assert not zero_copy.any()
    cases: list[tuple[str, torch.Tensor]] = [("grads", zero_copy)]
    for numel, dtype in [(2, torch.float32), (7, torch.float64), (1000, torch.int64), (513, torch.bfloat16)]:
        cases.append((f"t-{numel}", torch.zeros(numel, dtype=dtype)))
    for call in range(3):
        for key, buf in cases:
            buf.copy_(_value(rank, buf.numel(), buf.dtype, call))
            group.allreduce_(buf, key)
            results.append((key, call, buf.clone()))
    matrix = torch.zeros(5, 6).t()  # not contiguous: staged, and written back in its own layout
    matrix.copy_(torch.arange(30.0).view(6, 5) * (rank + 1))
    group.allreduce_(matrix, "matrix")
    results.append(("matrix", 0, matrix.clone()))
    for numel in (64, 65):  # one key, a new size: set up again
        buf = _value(rank, numel, torch.float32, 0)
        group.allreduce_(buf, "resized")
        results.append(("resized", numel, buf))
    leftover = sorted(os.listdir(Path(directory) / "shm"))
    group.close()
    out.put(pickle.dumps((rank, results, leftover)))  # plain pickle: torch's queue pickler shares fds


def test_every_rank_gets_the_exact_sum_with_the_same_bits(tmp_path):
    size = 3
    per_rank = _run(size, _sums, tmp_path)
    first = per_rank[0][1]
    for rank, results, leftover in per_rank:
        assert leftover == [], leftover  # every file unlinked once mapped
        for (key, call, got), (_, _, rank0) in zip(results, first, strict=True):
            assert torch.equal(got, rank0), (rank, key, call)  # identical bits everywhere
    for key, call, got in first:
        if key == "matrix":
            expected = torch.arange(30.0).view(6, 5) * 6
        elif key == "resized":
            expected = sum(_value(r, call, torch.float32, 0) for r in range(size))
        else:
            values = [_value(r, got.numel(), got.dtype, call) for r in range(size)]
            expected = values[0] + values[1] + values[2]  # rank order, as the reduction sums
        assert torch.equal(got, expected), (key, call)
    assert not list((tmp_path / "shm").iterdir())


def _dies(rank: int, size: int, directory: str, out) -> None:
    group = _group(Path(directory), rank, size)
    buf = group.alloc(100)
    buf.fill_(1.0)
    group.allreduce_(buf, "grads")
    if rank == 1:
        out.put((rank, "exited"))
        out.close()
        out.join_thread()
        os._exit(0)  # gone between two steps, as a crashed rank
    try:
        group.allreduce_(buf, "grads")
        out.put((rank, "no error"))
    except RuntimeError as e:
        out.put((rank, str(e)))


def test_a_peer_that_dies_is_an_error_not_a_hang(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_dies, args=(r, 2, str(tmp_path), out)) for r in range(2)]
    for p in procs:
        p.start()
    procs[1].join(timeout=60)  # reaped: its pid is gone
    results = dict(out.get(timeout=60) for _ in procs)
    procs[0].join(timeout=30)
    assert results[1] == "exited"
    assert shm.PEER_GONE in results[0] and "rank 1" in results[0], results[0]


def test_a_full_directory_is_unavailable_on_every_rank(tmp_path):
    missing = tmp_path / "no-such-dir"
    group = shm.ShmGroup(0, 2, "test", lambda obj: [obj, obj], directory=str(missing))
    assert not group.alloc(8).any()  # ordinary memory when no file can be made
    with pytest.raises(shm.Unavailable, match="rank 0: cannot create a shared file"):
        group.allreduce_(torch.ones(8), "grads")
    group.close()


def test_shards_cover_the_buffer_in_order():
    for numel in (0, 1, 2, 5, 1000, 1001):
        for size in (1, 2, 3, 8):
            bounds = shm.shards(numel, size)
            assert bounds[0][0] == 0 and bounds[-1][1] == numel
            assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))
            assert max(b - a for a, b in bounds) - min(b - a for a, b in bounds) <= 1


def test_closing_the_group_leaves_tensors_that_view_its_files_valid(tmp_path):
    # The model's parameters are views of a shared file: the group's close must not unmap them.
    group = shm.ShmGroup(0, 1, "test", lambda obj: [obj], directory=str(tmp_path))
    shared = group.shared("params", 1000, torch.float32, torch.arange(1000.0))
    grads = group.alloc(1000)
    group.prepare(grads, "grads")
    group.close()
    shared.add_(1.0)
    grads.fill_(2.0)
    assert float(shared.sum()) == sum(range(1, 1001)) and float(grads.sum()) == 2000.0
    assert not list(tmp_path.iterdir())  # the names went as soon as mapped
