"""Everything distributed, in one place: the only module that imports Horovod.

Every helper also works in one plain process (no horovodrun): the world is then of size 1 and the
collectives return their input, so the rest of dtrain never asks whether it is distributed.

Performance choices, made by ``init()`` on CPU where the user has not made them (measured on 2 cores;
rationale, numbers and how to reproduce them: docs/performance.md):

* torch intra-op threads = usable cores // ranks on this host, so ranks do not oversubscribe the
  cores (unless ``OMP_NUM_THREADS`` is set);
* the gradient collectives (``allreduce_sum_``, ``allreduce_average_``) travel as *one flat buffer*:
  several tensors are packed into a buffer kept between steps, or, when they already are views that
  tile one buffer in order, that buffer is reduced with no copy at all. Horovod's own fusion of a
  tensor list (a grouped allreduce) measured up to 2x slower than one tensor of the same bytes;
* on one host (every rank local, not elastic, no GPU), the flat buffer is summed through shared
  memory (``dtrain.shm``): the gradient buffer lives in a file every rank maps, each rank sums one
  shard of all of them and copies the others' sums, with no socket and no copy in. 0.27 ms against
  0.77 ms for Gloo over loopback for a small MLP's gradients, 3.4 against 27 ms for 17.7 MB;
* across hosts (not elastic, no GPU), the sum is hierarchical (``dtrain.hier``): shared memory within
  each host, and each rank's summed shard with its owners on the other hosts over Gloo subgroups, so
  each host sends ``2 (h-1)/h`` of the gradients (a ring over every rank sends ``2 (n-1)/n``);
* where shared memory cannot serve (not x86-64 Linux, or no room in ``/dev/shm``), the flat buffer
  is summed by ``torch.distributed`` on a Gloo process group set up beside Horovod (DDP's transport),
  not by Horovod: Horovod negotiates every collective in a background thread that wakes each
  ``HOROVOD_CYCLE_TIME`` and runs a small collective of its own *every cycle*, even when idle, which
  on 2 cores cost about half a core per rank and made each step's allreduce several times slower
  than Gloo's own. Horovod still carries everything else (broadcasts, gathers, barriers, Adasum, the
  elastic API), so its cycle is set to ``CONTROL_CYCLE_TIME_MS`` (10 ms): those are rare and the idle
  background thread then costs ~3% of a core. ``DTRAIN_ALLREDUCE`` chooses: ``auto`` (the default),
  ``shm``, ``hier``, ``torch`` (Gloo between every rank) or ``horovod``;
* where Horovod carries the gradients, ``HOROVOD_CYCLE_TIME`` = 0.1 ms (``CPU_CYCLE_TIME_MS``):
  Horovod's default cycle (1 ms) otherwise adds its wait to each step's collective;
* ``HOROVOD_FUSION_THRESHOLD`` is left at Horovod's default: one flat tensor has nothing to fuse.

Horovod's own tools pass through: ``HOROVOD_AUTOTUNE=1`` (with ``HOROVOD_AUTOTUNE_LOG``) and
``HOROVOD_TIMELINE=path`` are read by Horovod at ``hvd.init()``; with either set, ``auto`` keeps the
gradients on Horovod (so the tuner and the timeline see them), and with autotune the cycle time is
left unset for the tuner to choose. ``HOROVOD_CYCLE_TIME``, ``HOROVOD_FUSION_THRESHOLD`` and
``OMP_NUM_THREADS`` set by the user always win.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch

from dtrain import flat, groups, shm
from dtrain import transport as transport_choice

log = logging.getLogger(__name__)

T = TypeVar("T")

# Set by init(): the horovod.torch module when launched by horovodrun, else None (one process).
_hvd: Any = None
_initialized = False
# Set by init() where torch.distributed carries the gradient collectives (see gradient_transport()),
# and as the fallback of shared memory.
_group: Any = None
# Set by init() where shared memory carries the gradient collectives: a dtrain.shm.ShmGroup.
_shm: Any = None

CPU_CYCLE_TIME_MS = "0.1"  # Horovod carries the gradients: its cycle is on every step's critical path
CONTROL_CYCLE_TIME_MS = "10"  # Horovod carries only rare control messages: keep its idle polling cheap
# Allowed for a peer to reach a collective, e.g. while it waits for its data: as torch's own default.
GROUP_TIMEOUT = datetime.timedelta(minutes=30)


def launched_by_horovodrun() -> bool:
    return transport_choice.launched_by_horovodrun(os.environ)


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def gradient_transport() -> str:
    """``"shm"``, ``"torch"`` or ``"horovod"``: what will carry the gradient collectives (read before ``init``;
    the decision is ``dtrain.transport.choose``)."""
    return transport_choice.choose(os.environ, torch.cuda.is_available(), shm.supported())


def transport() -> str:
    """What carries the gradient collectives now: ``none`` (one process), ``shm``, ``hier``, ``torch`` or
    ``horovod``."""
    if not is_distributed():
        return "none"
    if _shm is not None:
        return "hier" if _shm.cross is not None else "shm"
    return "torch" if _group is not None else "horovod"


def init() -> None:
    """Join the Horovod world if launched by horovodrun; otherwise become a world of one."""
    global _hvd, _initialized, _group, _shm
    if _initialized:
        return
    if launched_by_horovodrun():
        chosen = gradient_transport()
        if not torch.cuda.is_available() and not transport_choice.flag(os.environ, "HOROVOD_AUTOTUNE"):
            # Read by Horovod's background thread when it starts (hvd.init); the user's value wins.
            os.environ.setdefault("HOROVOD_CYCLE_TIME",
                                  CPU_CYCLE_TIME_MS if chosen == "horovod" else CONTROL_CYCLE_TIME_MS)
        try:
            import horovod.torch as hvd
        except ImportError as e:
            from dtrain.config import UserError

            raise UserError(f"horovod.torch cannot be imported ({e}); run launch/setup.sh") from None
        hvd.init()
        _hvd = hvd
        if chosen in ("shm", "hier", "torch") and hvd.size() > 1:
            _group = groups.gloo_group(GROUP_TIMEOUT)
        if chosen == "shm" and hvd.size() > 1:
            _shm = groups.host_shm_group(GROUP_TIMEOUT)
        if chosen == "hier" and _group is not None:
            _shm = groups.hier_shm_group(GROUP_TIMEOUT)
    _initialized = True
    threads = configure_threads()
    if is_distributed() and is_main():
        why = transport_choice.fallback(os.environ, torch.cuda.is_available(), transport())
        log.info("%d ranks (%d on this host), %d torch thread(s) each, gradients over %s%s", size(), local_size(),
                 threads, transport_choice.NAMES[transport()],
                 f" (not through shared memory, nor hierarchically across hosts: {why})" if why else "")


def spans_hosts() -> bool:
    """Whether the ranks run on more than one host (``dtrain.transport.spans_hosts``)."""
    return transport_choice.spans_hosts(os.environ)


def main_address() -> str:
    """An address of rank 0's host that every rank reaches: loopback while the ranks share one host,
    else rank 0's address on the interface horovodrun chose for Gloo (a collective: every rank calls it)."""
    if not is_distributed() or not spans_hosts():
        return "127.0.0.1"
    return groups.interface_address(os.environ.get("HOROVOD_GLOO_IFACE"))


def configure_threads() -> int:
    """Give each rank its share of this host's cores, unless the user chose (OMP_NUM_THREADS)."""
    if "OMP_NUM_THREADS" in os.environ:
        return torch.get_num_threads()
    threads = max(1, usable_cores() // local_size())
    torch.set_num_threads(threads)
    return threads


def shutdown() -> None:
    global _hvd, _initialized, _group, _shm
    if _shm is not None:
        _shm.close()
    if _group is not None:
        import torch.distributed as tdist

        tdist.destroy_process_group()
    if _hvd is not None:
        _hvd.shutdown()
    _hvd, _initialized, _group, _shm = None, False, None, None
    _packer.clear()


def host_group() -> shm.ShmGroup | None:
    """The ranks of this host as a shared-memory group, where shared memory carries the gradients."""
    return _shm if is_distributed() else None


def is_distributed() -> bool:
    return _hvd is not None and _hvd.size() > 1


def rank() -> int:
    return _hvd.rank() if _hvd is not None else 0


def size() -> int:
    return _hvd.size() if _hvd is not None else 1


def local_rank() -> int:
    return _hvd.local_rank() if _hvd is not None else 0


def local_size() -> int:
    return _hvd.local_size() if _hvd is not None else 1


def is_main() -> bool:
    return rank() == 0


def device() -> torch.device:
    """``cuda:<local rank>`` where GPUs are present, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank() % torch.cuda.device_count())
    return torch.device("cpu")


def allreduce_sum_(tensors: Sequence[torch.Tensor], name: str = "grads", compression: str = "none",
                   uncompressed: Sequence[torch.Tensor] = ()) -> None:
    """Sum ``tensors`` and ``uncompressed`` in place across ranks, as one flat buffer in one collective.

    ``compression="fp16"`` sends ``tensors`` as float16 (half the bytes), as Horovod's
    ``Compression.fp16`` does; ``uncompressed`` (e.g. loss sums and counts, which float16 would
    overflow or round) always travel at full precision.

    Fastest when ``tensors`` followed by ``uncompressed`` are views that tile one 1-D buffer in order
    (see ``flat_views``): that buffer is reduced in place, with no copy.
    """
    if not is_distributed() or not (tensors or uncompressed):
        return
    if compression == "fp16":
        if _group is None:  # Horovod: one grouped collective, the float16 copies beside the counts
            wire = [t.to(torch.float16) if t.is_floating_point() else t for t in tensors]
            _hvd.grouped_allreduce_([*wire, *uncompressed], op=_hvd.Sum, name=name)
            for t, w in zip(tensors, wire, strict=True):
                if w is not t:
                    t.copy_(w)
            return
        _sum_flat_(list(tensors), name, wire_dtype=torch.float16)
        _sum_flat_(list(uncompressed), name + "-counts")
        return
    _sum_flat_([*tensors, *uncompressed], name)


def allreduce_average_(tensors: Sequence[torch.Tensor], name: str = "params") -> None:
    """Average ``tensors`` in place across ranks (local SGD's parameter averaging)."""
    if is_distributed() and tensors:
        _sum_flat_(list(tensors), name)
        for t in tensors:
            t.div_(size())


def flat_views(like: Sequence[torch.Tensor], extra: int = 0,
               dtype: torch.dtype = torch.float32) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Zeroed tensors shaped as ``like``, plus ``extra`` more elements, all views into one new buffer.

    Gradients allocated this way (``p.grad = view``), with the step's counts as the ``extra`` tail,
    let ``allreduce_sum_(views, uncompressed=[tail])`` reduce the whole buffer with no copy, as DDP's
    ``gradient_as_bucket_view`` does. Returns ``(views, tail)``.
    """
    return flat.flat_views(like, extra, dtype, _new_buffer)


def _new_buffer(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zeroed 1-D buffer for collectives: in shared memory where that carries them (no copy in)."""
    if _shm is not None and device.type == "cpu":
        buf: torch.Tensor = _shm.alloc(numel, dtype)
        return buf
    return torch.zeros(numel, dtype=dtype, device=device)


_packer = flat.Packer(_new_buffer)  # buffers the gradient collectives pack into, kept between steps


def _sum_flat_(tensors: list[torch.Tensor], name: str, wire_dtype: torch.dtype | None = None) -> None:
    """Sum ``tensors`` in place across ranks as one flat buffer (see the module's docstring)."""
    if not tensors:
        return
    kinds = dict.fromkeys((t.dtype, t.device) for t in tensors)
    if len(kinds) > 1:  # mixed dtypes or devices: one buffer per kind, in first-seen order
        for dtype, dev in kinds:
            _sum_flat_([t for t in tensors if t.dtype == dtype and t.device == dev], f"{name}-{dtype}", wire_dtype)
        return
    base = flat.tiled_base(tensors)
    buf = base if base is not None else _packer.pack(tensors, name)
    if wire_dtype is not None and buf.is_floating_point() and buf.dtype != wire_dtype:
        wire = buf.to(wire_dtype)
        _collective_sum_(wire, name)
        buf.copy_(wire)
    else:
        _collective_sum_(buf, name)
    if base is None:
        _packer.unpack(buf, tensors)


def _collective_sum_(buf: torch.Tensor, name: str) -> None:
    global _shm
    if _shm is not None and buf.device.type == "cpu":
        try:
            _shm.allreduce_(buf, name)
            return
        except shm.Unavailable as e:  # every rank learns it in the same call: all fall back together
            log.warning("%s: gradients travel over Gloo instead (make room in /dev/shm, or set %s=torch)",
                        e, transport_choice.ENV)
            _shm.close()
            _shm = None
    if _group is not None:
        import torch.distributed as tdist

        tdist.all_reduce(buf, group=_group)
    else:
        _hvd.allreduce_(buf, op=_hvd.Sum, name=name)


def adasum_(tensors: Sequence[torch.Tensor], name: str = "grads") -> None:
    """Combine per-rank gradients in place with Adasum (needs Horovod built with MPI or NCCL)."""
    if not is_distributed() or not tensors:
        return
    try:
        _hvd.grouped_allreduce_(list(tensors), op=_hvd.Adasum, name=name)
    except Exception as e:  # Horovod raises HorovodInternalError("No Adasum operation enabled")
        from dtrain.config import UserError

        raise UserError(f"--reduction adasum: this Horovod cannot ({e}); build it with MPI or NCCL "
                        "(DTRAIN_WITH_NCCL=1 launch/setup.sh) or use --reduction sum") from None


def allgather_object(obj: T, name: str = "gather") -> list[T]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not is_distributed():
        return [obj]
    return list(_hvd.allgather_object(obj, name=name))


def allreduce_sum(values: Sequence[float], name: str = "scalars") -> list[float]:
    """Sum a few Python numbers across ranks (float64, so counts stay exact)."""
    t = torch.tensor(list(values), dtype=torch.float64)
    if is_distributed():
        t = _hvd.allreduce(t, op=_hvd.Sum, name=name)
    return t.tolist()


def broadcast_object(obj: T, root: int = 0, name: str = "object") -> T:
    """Rank ``root``'s ``obj`` on every rank (pickled)."""
    if not is_distributed():
        return obj
    result: T = _hvd.broadcast_object(obj, root_rank=root, name=name)
    return result


def broadcast_parameters(module: torch.nn.Module, root: int = 0, buffers_only: bool = False) -> None:
    """Make every rank's parameters and buffers equal to rank ``root``'s (``buffers_only``: the
    parameters are one copy that the ranks share, ``dtrain.sharded``)."""
    if is_distributed():
        tensors = dict(module.named_buffers()) if buffers_only else module.state_dict()
        if tensors:
            _hvd.broadcast_parameters(tensors, root_rank=root)


def barrier() -> None:
    if is_distributed():
        _hvd.barrier()


def run_on_main(fn: Callable[[], T], name: str = "result") -> T:
    """Run ``fn`` on rank 0 and give its result (or its exception) to every rank.

    Every rank must reach the broadcast even when rank 0 fails, or the others would wait forever:
    the exception travels instead of the result and is raised everywhere.

    Elastic runs allow no collective outside the elastic loop (a worker joining later would wait in
    it forever), so there every rank runs ``fn`` itself: callers pass deterministic work only.
    """
    if is_elastic():
        return fn()
    outcome: tuple[bool, Any] = (True, None)
    if is_main():
        try:
            outcome = (True, fn())
        except Exception as e:
            outcome = (False, e)
    ok, value = broadcast_object(outcome, name=name)
    if not ok:
        if not is_main():
            value.dtrain_relayed = True  # rank 0 reports it: the other ranks raise it only to stop
        raise value
    return value


# What Gloo (torch.distributed) and dtrain.shm say when a peer's process is gone.
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "remote worker crashing", shm.PEER_GONE)


def peer_failure(error: BaseException) -> bool:
    """Whether ``error`` is Horovod, or the Gloo group carrying the gradients, reporting that another
    rank failed (its traceback is shown there)."""
    text = str(error)
    if isinstance(error, RuntimeError) and any(s in text for s in _PEER_GONE):
        return True
    try:
        from horovod.common.exceptions import HorovodInternalError
    except ImportError:
        return False
    return isinstance(error, HorovodInternalError) or "Horovod has been shut down" in text


# -- elastic training -------------------------------------------------------------------------------


def is_elastic() -> bool:
    """Launched by an elastic horovodrun (--min-np/--max-np/--host-discovery-script)."""
    return os.environ.get("HOROVOD_ELASTIC") == "1"


def elastic_state_base() -> type:
    """Horovod's elastic ``State`` class, which ``dtrain.elastic`` builds dtrain's training state on."""
    from horovod.common.elastic import State

    return State


def broadcast_object_fn() -> Callable[..., Any]:
    """Horovod's ``broadcast_object`` (with ``root_rank`` and ``name``), for ``dtrain.elastic``'s state."""
    fn: Callable[..., Any] = _hvd.broadcast_object
    return fn


def elastic_resets() -> tuple[type[BaseException], ...]:
    """The exceptions by which Horovod interrupts the loop for a world change: (failure, hosts changed)."""
    if not is_elastic():
        return ()
    from horovod.common.exceptions import HorovodInternalError, HostsUpdatedInterrupt

    return HorovodInternalError, HostsUpdatedInterrupt


def run_elastic(fn: Callable[[Any], T], state: Any) -> T:
    """``fn(state)``, restarted by Horovod after every world change (elastic runs), or called once."""
    if not is_elastic():
        return fn(state)
    import horovod.torch as hvd

    result: T = hvd.elastic.run(fn)(state)
    return result
