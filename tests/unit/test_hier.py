"""The hierarchical allreduce (dtrain.hier over dtrain.shm): its plan, and its sums between real processes.

The processes stand for ranks on several hosts: each "host" has its own shared-memory files, and the
ranks sum across hosts over real torch.distributed Gloo subgroups on loopback, as in dtrain.
"""

from __future__ import annotations

import datetime
import itertools
import os
import pickle
from pathlib import Path

import pytest
import torch

from dtrain import hier, shm

from shm_ranks import _exchange, run as _run  # isort: skip

pytestmark = [pytest.mark.unit, pytest.mark.timeout(120)]


def _cover(layout: hier.Layout, numel: int) -> None:
    """Every rank's atoms tile its shard, and every atom's owners are one rank per host."""
    for host in layout.hosts:
        for local, rank in enumerate(host):
            atoms = layout.atoms(numel, rank)
            lo, hi = shm.shards(numel, len(host))[local]
            assert atoms[0][0] == lo and atoms[-1][1] == hi
            assert all(a[1] == b[0] for a, b in itertools.pairwise(atoms))
            for _, _, owners in atoms:
                assert owners[layout.hosts.index(host)] == rank and len(owners) == len(layout.hosts)
                assert owners in layout.groups()


@pytest.mark.parametrize("sizes", [(2, 2), (2, 1, 1), (3, 2), (1, 1), (4, 3, 2, 1), (8, 8)])
@pytest.mark.parametrize("numel", [1, 5, 97, 10_000])
def test_atoms_tile_every_hosts_shards(sizes, numel):
    it = iter(range(sum(sizes)))
    layout = hier.Layout(tuple(tuple(next(it) for _ in range(n)) for n in sizes))
    _cover(layout, numel)


def test_equal_hosts_pair_each_local_rank_with_its_peers():
    layout = hier.Layout.of([("a", 0), ("a", 1), ("b", 0), ("b", 1)])
    assert layout.hosts == ((0, 1), (2, 3)) and layout.uniform
    assert layout.groups() == [(0, 2), (1, 3)]  # one group per local index, as many as ranks per host
    assert layout.atoms(10, 3) == [(5, 10, (1, 3))]
    assert layout.host_of(3) == (1, 1)


def test_unequal_hosts_cut_atoms_at_every_boundary():
    layout = hier.Layout.of([("a", 0), ("a", 1), ("b", 0), ("c", 0)])
    assert not layout.uniform
    assert layout.groups() == [(0, 2, 3), (1, 2, 3)]
    assert layout.atoms(10, 2) == [(0, 5, (0, 2, 3)), (5, 10, (1, 2, 3))]  # one shard, two atoms


@pytest.mark.parametrize(("placed", "problem"), [
    ([("a", 0), ("a", 0)], "both local rank 0"),
    ([("a", 0), ("a", 2)], "not 0..1"),
])
def test_a_placement_that_is_not_one_of_hosts_is_an_error(placed, problem):
    with pytest.raises(ValueError, match=problem):
        hier.Layout.of(placed)


# -- real processes -----------------------------------------------------------------------------------


def _value(rank: int, numel: int, call: int) -> torch.Tensor:
    return torch.randn(numel, generator=torch.Generator().manual_seed(1000 * call + rank))


def _sums(rank: int, size: int, directory: str, out, sizes: tuple[int, ...], port: int) -> None:
    import torch.distributed as tdist

    torch.set_num_threads(1)
    it = iter(range(size))
    layout = hier.Layout(tuple(tuple(next(it) for _ in range(n)) for n in sizes))
    host, local = layout.host_of(rank)
    store = tdist.TCPStore("127.0.0.1", port, size, is_master=rank == 0, timeout=datetime.timedelta(seconds=60))
    tdist.init_process_group("gloo", store=store, rank=rank, world_size=size)
    cross = hier.CrossHost(layout, rank, lambda ranks: tdist.new_group(ranks, backend="gloo"),
                           lambda t, g: tdist.all_reduce(t, group=g))
    shm_dir = Path(directory) / "shm"
    shm_dir.mkdir(exist_ok=True)
    (Path(directory) / "ex").mkdir(exist_ok=True)
    group = shm.ShmGroup(local, len(layout.hosts[host]), f"t-h{host}", _exchange(Path(directory) / "ex", rank, size),
                         directory=str(shm_dir), members=layout.hosts[host], cross=cross)
    results = []
    grads = group.alloc(10_001)
    for call in range(2):  # the allreduce, twice through the same files
        grads.copy_(_value(rank, grads.numel(), call))
        group.allreduce_(grads, "grads")
        results.append(grads.clone())
    odd = _value(rank, 7, 5)  # fewer elements than some hosts have atoms
    group.allreduce_(odd, "odd")
    results.append(odd)
    # The sharded sum: this rank's shard of 1,000 elements, and a tail of 3 counts written by finish.
    buf = group.alloc(1_003)
    buf.copy_(_value(rank, buf.numel(), 9))
    summed, lo = group.reduce_scatter_(buf, "sharded", 1_000)
    shard = (lo, summed.clone())
    group.finish("sharded", buf)
    results.append(buf[1_000:].clone())
    group.close()
    tdist.destroy_process_group()
    out.put(pickle.dumps((rank, results, shard, sorted(os.listdir(shm_dir)))))


@pytest.mark.parametrize("sizes", [(2, 2), (2, 1, 1), (1, 2)])
def test_the_hierarchical_sum_is_the_flat_sum_on_every_rank(tmp_path, sizes):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    size = sum(sizes)
    per_rank = _run(size, _sums, tmp_path, sizes, port)
    flat = [sum(_value(r, n, call).double() for r in range(size)) for n, call in ((10_001, 0), (10_001, 1), (7, 5))]
    whole = sum(_value(r, 1_003, 9).double() for r in range(size))
    for rank, results, (lo, shard), leftover in per_rank:
        assert leftover == [], leftover
        for got, expected, first in zip(results, [*flat, whole[1_000:]], per_rank[0][1], strict=True):
            assert torch.allclose(got.double(), expected, rtol=0, atol=1e-5), rank  # float32, another order
            assert torch.equal(got, first), rank  # the same bits on every rank, on every host
        assert torch.allclose(shard.double(), whole[lo : lo + shard.numel()], rtol=0, atol=1e-5)
