"""The cross-host half of the hierarchical allreduce: each rank sums the shard it owns with the ranks of
the other hosts that own the same elements.

Across hosts, a flat allreduce sends every rank's whole gradient over the network. The hierarchical
one (Horovod's ``HOROVOD_HIERARCHICAL_ALLREDUCE``, NCCL's trees, DeepSpeed's and torch's 2-D meshes do
the same) first sums within each host through shared memory (``dtrain.shm``: rank ``r`` of a host sums
shard ``r`` of its host's buffers), then sums each shard across hosts, then lets the host's ranks read
every summed shard. Each host sends ``2 (h-1)/h`` of the gradient once, as a ring over hosts does, and
every local rank carries its share of it on its own connections: no leader rank and no idle link.

With the same number of ranks on every host, local rank ``l`` of every host owns the same shard, and
the ranks of local index ``l`` form one group. With unequal hosts (say 2, 1 and 1 ranks), the shards
differ from host to host, so the buffer is cut at the union of every host's shard boundaries into
*atoms*: each atom lies inside one shard of every host, and is summed by those owners (one per host).
A rank walks its atoms in increasing offset, which no two ranks can order differently, so the groups
never wait on each other in a cycle.

``Layout`` is the pure plan (tested without a cluster); ``CrossHost`` runs it over torch.distributed
Gloo subgroups (flat Gloo measured faster than Horovod across hosts: docs/performance.md).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import torch

Atom = tuple[int, int, tuple[int, ...]]  # [start, stop) of the buffer, and the global ranks that sum it


@dataclass(frozen=True)
class Layout:
    """Where the ranks are: ``hosts[h]`` lists host ``h``'s global ranks in local-rank order."""

    hosts: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        ranks = sorted(r for host in self.hosts for r in host)
        if not self.hosts or any(not host for host in self.hosts) or ranks != list(range(len(ranks))):
            raise ValueError(f"hosts {self.hosts} do not list the ranks 0..n-1 once each")

    @classmethod
    def of(cls, placed: Sequence[tuple[str, int]]) -> Layout:
        """From every rank's ``(host name, local rank)``, in rank order; hosts in order of their first rank."""
        by_host: dict[str, dict[int, int]] = {}
        for rank, (host, local) in enumerate(placed):
            if local in by_host.setdefault(host, {}):
                raise ValueError(f"ranks {by_host[host][local]} and {rank} are both local rank {local} on {host}")
            by_host[host][local] = rank
        hosts = []
        for host, locals_ in by_host.items():
            if sorted(locals_) != list(range(len(locals_))):
                raise ValueError(f"host {host}'s local ranks are {sorted(locals_)}, not 0..{len(locals_) - 1}")
            hosts.append(tuple(locals_[i] for i in range(len(locals_))))
        return cls(tuple(hosts))

    @property
    def uniform(self) -> bool:
        """Whether every host has as many ranks: then every host cuts the same shards."""
        return len({len(h) for h in self.hosts}) == 1

    def host_of(self, rank: int) -> tuple[int, int]:
        """``(host index, local rank)`` of a global rank."""
        for h, host in enumerate(self.hosts):
            if rank in host:
                return h, host.index(rank)
        raise ValueError(f"rank {rank} is on no host of {self.hosts}")

    @functools.cached_property
    def _cuts(self) -> list[tuple[Fraction, Fraction, tuple[int, ...]]]:
        """The atoms as fractions of the buffer (independent of its length), with their owners."""
        points = sorted({Fraction(r, len(host)) for host in self.hosts for r in range(len(host) + 1)})
        return [(a, b, tuple(host[int(a * len(host))] for host in self.hosts))
                for a, b in itertools.pairwise(points)]

    def groups(self) -> list[tuple[int, ...]]:
        """Every group of owners an atom can have, in one order that every rank computes alike."""
        return list(dict.fromkeys(owners for _, _, owners in self._cuts))

    def atoms(self, numel: int, rank: int) -> list[Atom]:
        """The atoms of a ``numel``-element buffer inside ``rank``'s shard (as ``shm.shards`` cuts them),
        in increasing offset. Empty atoms are included: their owners agree on skipping them."""
        mine = []
        for a, b, owners in self._cuts:
            if rank in owners:
                mine.append((numel * a.numerator // a.denominator, numel * b.numerator // b.denominator, owners))
        return mine


class CrossHost:
    """Sums a rank's summed shard with its owners on the other hosts (see the module's docstring).

    ``new_group(ranks)`` makes a process group of those global ranks; it is a collective of the whole
    world (as ``torch.distributed.new_group``), so every rank makes every group, in the same order.
    ``all_reduce(tensor, group)`` sums in place over a group.
    """

    def __init__(self, layout: Layout, rank: int, new_group: Callable[[list[int]], Any],
                 all_reduce: Callable[[torch.Tensor, Any], None]):
        self.layout, self.rank = layout, rank
        self._all_reduce = all_reduce
        self._groups = {owners: new_group(list(owners)) for owners in layout.groups()}
        self._atoms: dict[int, list[Atom]] = {}

    def __call__(self, out: torch.Tensor, lo: int, numel: int) -> None:
        """Sum ``out`` across hosts: this rank's shard of a ``numel``-element buffer, starting at ``lo``.
        Elements of ``out`` past ``numel - lo`` (a tail of counts, held by the owner of the buffer's end)
        travel with the last atom."""
        atoms = self._atoms.get(numel)
        if atoms is None:
            atoms = self._atoms[numel] = self.layout.atoms(numel, self.rank)
        for a, b, owners in atoms:
            view = out[a - lo : (b - lo) if b < numel else out.numel()]
            if view.numel():
                self._all_reduce(view, self._groups[owners])
