"""The Dask cluster a run reads from: an existing scheduler, or an embedded LocalCluster.

Under horovodrun the embedded cluster is started by rank 0 alone; the other ranks connect to the
address it broadcasts, so all ranks share one cluster and its cached partitions.

While the ranks share one host the embedded cluster listens on loopback only. When they span
several hosts it listens on rank 0's address on the interface horovodrun chose for Gloo, and since
a Dask scheduler runs whatever it is sent, it then speaks TLS with a certificate and key made for
this run (``Security.temporary()``), which the other ranks receive from rank 0 over Horovod: only
the job's own processes can connect. Its workers run on rank 0's host; ranks elsewhere fetch their
rows from them over the network (docs/deploy.md, "Several hosts").

A cluster of the user's own (``--scheduler``) is reached with Dask's configuration, so
``tls://`` addresses take their certificates from ``DASK_DISTRIBUTED__COMM__TLS__*`` variables.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator

import dask
import psutil
from distributed import Client, LocalCluster
from distributed.security import Security

from dtrain import clusterplugins, dist
from dtrain.config import ClusterConfig, HostError

log = logging.getLogger(__name__)

# glibc's malloc settings for the Dask workers dtrain starts (here, launch/dask_cluster.sh, k8s/): a
# partition's arrays (megabytes each, made and freed at every epoch) are then reused heap memory. Dask
# sets MALLOC_TRIM_THRESHOLD_=64 KiB so that workers hand freed memory back at once, and any explicit
# setting also fixes glibc's mmap threshold at 128 KiB: every array became a fresh mapping whose pages
# fault in, then unmapped when freed. Preparing 32 partitions of 31k rows took 306 ms of CPU against 74
# with these values (glibc's own adaptive ceiling), and the worker of benchmarks/stream_bench.py 0.95 s
# per pass against 0.6, for 1.2x the samples/s; its memory settles ~130 MB higher and stays there.
# A variable exported in the environment wins (Dask's precedence); Dask configuration of these keys does not.
WORKER_MALLOC = {"MALLOC_MMAP_THRESHOLD_": 32 << 20, "MALLOC_TRIM_THRESHOLD_": 64 << 20}


@contextlib.contextmanager
def worker_environment() -> Iterator[None]:
    """Dask's configuration under which a Nanny made inside it starts its worker with WORKER_MALLOC.

    glibc reads these once, when the process starts, so they are Dask's pre-spawn environment. A Nanny
    writes that environment into this process's own before it spawns (and keeps it for restarts): it
    is taken back on exit, so that what this process starts later (a rank, a test's job) does not
    inherit the workers' settings, nor Dask's ``OMP_NUM_THREADS=1``.
    """
    before = dict(os.environ)
    try:
        with dask.config.set({f"distributed.nanny.pre-spawn-environ.{k}": v for k, v in WORKER_MALLOC.items()}):
            yield
    finally:
        for key in set(os.environ) | set(before):
            if os.environ.get(key) != before.get(key):
                if key in before:
                    os.environ[key] = before[key]
                else:
                    del os.environ[key]


def _local_cluster(cfg: ClusterConfig, host: str = "127.0.0.1", security: Security | None = None) -> LocalCluster:
    # The ranks use the cores for training; the workers mostly wait on I/O and numpy, which release
    # the GIL. One worker per two cores (at least one), threads to fill those cores, memory shared.
    cores = dist.usable_cores()
    workers = cfg.dask_workers or max(1, cores // 4)
    memory = int(psutil.virtual_memory().total * 0.5 / workers)
    with worker_environment():
        return LocalCluster(
            n_workers=workers,
            threads_per_worker=max(1, cores // workers),
            processes=True,
            memory_limit=memory,
            # any free port: a fixed 8787 collides with other clusters; on this host only
            dashboard_address="127.0.0.1:0",
            host=host,
            protocol="tls://" if security else "tcp://",
            security=security,
            silence_logs=logging.WARNING,
        )


def _connect(address: str, timeout: float, security: Security | None = None) -> Client:
    # A HostError: one host may fail to reach an address that the others reach.
    try:
        return Client(address, timeout=timeout, set_as_default=True, security=security)
    except (OSError, TimeoutError) as e:
        raise HostError(
            f"--scheduler: cannot reach the Dask scheduler at {address} within {timeout:g}s ({type(e).__name__}); "
            "check the address and that the scheduler runs, or omit --scheduler to start a local cluster"
        ) from None
    except TypeError as e:
        if "ssl_context" not in str(e):
            raise
        raise HostError(
            f"--scheduler: {address} speaks TLS and no certificate is configured here; set "
            "DASK_DISTRIBUTED__COMM__TLS__CA_FILE, DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT and "
            "DASK_DISTRIBUTED__COMM__TLS__CLIENT__KEY on every host (docs/deploy.md)"
        ) from None


def reconnect(client: Client, address: str, until: float) -> tuple[Client, bool]:
    """Try until ``until`` (``time.monotonic()``) for a client to the scheduler at ``address`` with a worker.

    Returns the client to use from now on and whether it is ready. After losing its scheduler, Dask's
    client retries it in the background for its ``timeout`` (--connect-timeout), then closes for
    good: a new client to the same address takes over from there. A scheduler that came back is a new
    one, without tasks or workers until they rejoin, and without dtrain's plugins, registered again.
    """
    while (left := until - time.monotonic()) > 0:
        if client.status in ("closing", "closed"):
            # TimeoutError is an OSError: the scheduler is not back yet.
            with contextlib.suppress(OSError):
                client = Client(address, timeout=left, set_as_default=True)
        elif client.status != "running":
            time.sleep(min(0.1, left))
        else:
            try:
                client.wait_for_workers(1, timeout=left)
            except OSError:  # none joined in time (a TimeoutError), or the scheduler went again
                time.sleep(min(0.1, max(0.0, until - time.monotonic())))
                continue
            clusterplugins.install(client)
            return client, True
    return client, False


@contextlib.contextmanager
def connect(cfg: ClusterConfig) -> Iterator[Client]:
    """A client on every rank, closed (and the embedded cluster shut down) on exit."""
    logging.getLogger("distributed").setLevel(logging.WARNING)
    # Dask keeps each connection's last messages for debugging (1000 by default); ours carry row
    # indexes, so a long log would grow a rank's memory with every request.
    dask.config.set({"distributed.admin.low-level-log-length": 64})
    cluster: LocalCluster | None = None
    address = cfg.scheduler
    security: Security | None = None
    if address is None:
        host = dist.main_address()

        def start() -> tuple[str, Security | None]:
            nonlocal cluster
            made = None if host == "127.0.0.1" else Security.temporary()
            cluster = _local_cluster(cfg, host, made)
            if made is not None:
                log.info("embedded Dask cluster at %s (TLS, a certificate made for this run)",
                         cluster.scheduler_address)
            return str(cluster.scheduler_address), made

        address, security = dist.run_on_main(start, name="dask-address")
    client = _connect(address, cfg.connect_timeout, security)
    clusterplugins.install(client)  # quiet about data errors the ranks report; tasks survive a lost worker
    try:
        yield client
        # Wait until no rank needs the cluster. Only on success: after an error the other ranks may
        # be inside a different collective, and a barrier here would deadlock the job instead of
        # letting this rank exit (horovodrun then stops the others).
        dist.barrier()
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
