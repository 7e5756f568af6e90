"""Everything distributed, in one place: the only module that imports Horovod.

Every helper also works in one plain process (no horovodrun): the world is then of size 1 and the
collectives return their input, so the rest of dtrain never asks whether it is distributed.

Performance defaults for CPU (measured on 2 cores, 2 ranks, small MLP: 57 ms/step with default threads,
7.9 ms with one intra-op thread per rank, 2.6 ms adding a 0.1 ms Horovod cycle time):

* torch intra-op threads = usable cores // ranks on this host, so ranks do not oversubscribe cores;
* ``HOROVOD_CYCLE_TIME`` = 0.1 ms: Horovod's background thread otherwise waits up to its default cycle
  (several ms) before each collective, which dominates a small model's step on CPU.

Both are applied only where the user has not set them (``OMP_NUM_THREADS``, ``HOROVOD_CYCLE_TIME``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch

log = logging.getLogger(__name__)

T = TypeVar("T")

# Set by init(): the horovod.torch module when launched by horovodrun, else None (one process).
_hvd: Any = None
_initialized = False

CPU_CYCLE_TIME_MS = "0.1"


def launched_by_horovodrun() -> bool:
    return "HOROVOD_RANK" in os.environ or os.environ.get("HOROVOD_ELASTIC") == "1"


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def init() -> None:
    """Join the Horovod world if launched by horovodrun; otherwise become a world of one."""
    global _hvd, _initialized
    if _initialized:
        return
    if launched_by_horovodrun():
        if not torch.cuda.is_available():
            os.environ.setdefault("HOROVOD_CYCLE_TIME", CPU_CYCLE_TIME_MS)
        try:
            import horovod.torch as hvd
        except ImportError as e:
            from dtrain.config import UserError

            raise UserError(f"horovod.torch cannot be imported ({e}); run launch/setup.sh") from None
        hvd.init()
        _hvd = hvd
    _initialized = True
    configure_threads()
    log.debug("rank %d of %d (local %d of %d)", rank(), size(), local_rank(), local_size())


def configure_threads() -> int:
    """Give each rank its share of this host's cores, unless the user chose (OMP_NUM_THREADS)."""
    if "OMP_NUM_THREADS" in os.environ:
        return torch.get_num_threads()
    threads = max(1, usable_cores() // local_size())
    torch.set_num_threads(threads)
    return threads


def shutdown() -> None:
    global _hvd, _initialized
    if _hvd is not None:
        _hvd.shutdown()
    _hvd, _initialized = None, False


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
    """Sum ``tensors`` and ``uncompressed`` in place across ranks, all in one fused collective.

    ``compression="fp16"`` sends ``tensors`` as float16 (half the bytes), as Horovod's
    ``Compression.fp16`` does; ``uncompressed`` (e.g. loss sums and counts, which float16 would
    overflow or round) always travel at full precision.
    """
    if not is_distributed() or not (tensors or uncompressed):
        return
    if compression == "fp16":
        wire = [t.to(torch.float16) if t.is_floating_point() else t for t in tensors]
        _hvd.grouped_allreduce_([*wire, *uncompressed], op=_hvd.Sum, name=name)
        for t, w in zip(tensors, wire, strict=True):
            if w is not t:
                t.copy_(w)
        return
    _hvd.grouped_allreduce_([*tensors, *uncompressed], op=_hvd.Sum, name=name)


def allreduce_average_(tensors: Sequence[torch.Tensor], name: str = "params") -> None:
    """Average ``tensors`` in place across ranks (local SGD's parameter averaging)."""
    if is_distributed() and tensors:
        _hvd.grouped_allreduce_(list(tensors), op=_hvd.Average, name=name)


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


def broadcast_parameters(module: torch.nn.Module, root: int = 0) -> None:
    """Make every rank's parameters and buffers equal to rank ``root``'s."""
    if is_distributed():
        _hvd.broadcast_parameters(module.state_dict(), root_rank=root)


def barrier() -> None:
    if is_distributed():
        _hvd.barrier()


def run_on_main(fn: Callable[[], T], name: str = "result") -> T:
    """Run ``fn`` on rank 0 and give its result (or its exception) to every rank.

    Every rank must reach the broadcast even when rank 0 fails, or the others would wait forever:
    the exception travels instead of the result and is raised everywhere.
    """
    outcome: tuple[bool, Any] = (True, None)
    if is_main():
        try:
            outcome = (True, fn())
        except Exception as e:
            outcome = (False, e)
    ok, value = broadcast_object(outcome, name=name)
    if not ok:
        raise value
    return value


def peer_failure(error: BaseException) -> bool:
    """Whether ``error`` is Horovod reporting that another rank failed (its traceback is shown there)."""
    try:
        from horovod.common.exceptions import HorovodInternalError
    except ImportError:
        return False
    text = str(error)
    return isinstance(error, HorovodInternalError) or "Horovod has been shut down" in text
