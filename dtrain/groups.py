"""The groups that carry the gradient sum beside Horovod, set up once by ``dist.init`` over Horovod's ranks.

* ``gloo_group``: a torch.distributed Gloo process group (DDP's transport), whose store rank 0 serves;
* ``host_shm_group``: this host's ranks summing through shared memory (``dtrain.shm``);
* ``hier_shm_group``: the same on each of several hosts, whose ranks also sum their shards across
  hosts over Gloo subgroups of ``gloo_group``'s (``dtrain.hier``).

Both are made with ``dtrain.dist``'s collectives (which this module calls, never Horovod itself), so
Horovod stays imported by ``dist`` alone.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import uuid
from typing import Any

from dtrain import dist, hier, shm, supervise

log = logging.getLogger(__name__)


def host_shm_group(timeout: datetime.timedelta) -> shm.ShmGroup:
    """This host's ranks summing through shared memory; rank 0 names the job's files."""
    token: str = dist.broadcast_object(uuid.uuid4().hex[:12] if dist.rank() == 0 else "", name="dtrain-shm-token")
    return shm.ShmGroup(dist.rank(), dist.size(), token,
                        exchange=lambda obj: dist.allgather_object(obj, name="dtrain-shm"),
                        timeout=timeout.total_seconds())


def hier_shm_group(timeout: datetime.timedelta) -> shm.ShmGroup:
    """This host's ranks summing through shared memory, and their shards across hosts (``dtrain.hier``).

    Needs ``gloo_group``'s default group: the subgroups across hosts are made from it, by every rank.
    """
    import torch.distributed as tdist

    placed = dist.allgather_object((supervise.host(), dist.local_rank()), name="dtrain-hosts")
    layout = hier.Layout.of(placed)
    host, local = layout.host_of(dist.rank())
    token: str = dist.broadcast_object(uuid.uuid4().hex[:12] if dist.rank() == 0 else "", name="dtrain-shm-token")

    # A peer cut off mid-sum ends this rank in seconds, not at the group's timeout (supervise.Watch).
    watch = supervise.Watch(dist.rank(), dist.size(), {r for g in layout.groups() if dist.rank() in g for r in g})

    def all_reduce(t: Any, group: Any) -> None:
        with watch.inside():
            tdist.all_reduce(t, group=group)

    cross = hier.CrossHost(layout, dist.rank(), lambda ranks: tdist.new_group(ranks, timeout=timeout, backend="gloo"),
                           all_reduce)
    log.debug("hosts %s; this rank is local rank %d of host %d", layout.hosts, local, host)
    # The host's index in the files' names: hosts that share a /dev/shm (containers, the test bed) do not mix.
    return shm.ShmGroup(local, len(layout.hosts[host]), f"{token}-h{host}",
                        exchange=lambda obj: dist.allgather_object(obj, name="dtrain-shm"),
                        timeout=timeout.total_seconds(), members=layout.hosts[host], cross=cross)


def gloo_group(timeout: datetime.timedelta) -> Any:
    """A torch.distributed Gloo process group over Horovod's ranks; rank 0's store address is broadcast.

    None (Horovod then carries the gradients) if this process already has a default group of its own.
    """
    import torch.distributed as tdist

    if tdist.is_initialized():
        log.info("torch.distributed is already initialised by this program: gradients travel over Horovod")
        return None
    iface = os.environ.get("HOROVOD_GLOO_IFACE")
    if iface:  # the interface horovodrun chose for Gloo (``lo`` on one host): Gloo's sockets use it too
        os.environ.setdefault("GLOO_SOCKET_IFNAME", iface)
    host = interface_address(iface) if dist.spans_hosts() else "127.0.0.1"
    rank, size = dist.rank(), dist.size()
    store = None
    port = 0
    if rank == 0:  # port 0: the OS picks a free one, no race with other jobs on this host
        store = tdist.TCPStore(host, 0, size, is_master=True, timeout=timeout, wait_for_workers=False)
        port = store.port
    port = dist.broadcast_object(port, name="dtrain-gloo-store")
    if store is None:
        store = tdist.TCPStore(host, port, size, is_master=False, timeout=timeout)
    tdist.init_process_group("gloo", store=store, rank=rank, world_size=size, timeout=timeout)
    return tdist.group.WORLD


def interface_address(iface: str | None) -> str:
    """Rank 0's IPv4 address on ``iface`` (every rank reaches it there), broadcast to all."""
    address = ""
    if dist.rank() == 0:
        import psutil

        addrs = psutil.net_if_addrs().get(iface or "", []) if iface else []
        address = next((a.address for a in addrs if a.family == socket.AF_INET), "") or socket.gethostbyname(
            socket.gethostname())
    return dist.broadcast_object(address, name="dtrain-gloo-host")
