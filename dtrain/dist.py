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


# -- elastic training -------------------------------------------------------------------------------


def is_elastic() -> bool:
    """Launched by an elastic horovodrun (--min-np/--max-np/--host-discovery-script)."""
    return os.environ.get("HOROVOD_ELASTIC") == "1"


class LocalState:
    """The training state of a fixed world: attributes, no commits, no rollbacks."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, **attrs: Any):
        self.model, self.optimizer = model, optimizer
        self.__dict__.update(attrs)

    def commit(self) -> None:
        pass

    def save(self) -> None:
        pass

    def register_reset_callbacks(self, callbacks: list[Callable[[], None]]) -> None:
        pass


def training_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, **attrs: Any) -> Any:
    """What a rollback restores and a joining rank receives: model, optimizer and ``attrs``.

    Elastic runs get a Horovod ``State`` whose ``sync`` broadcasts rank 0's model, optimizer state and
    attributes as one object. (Horovod's ``TorchState`` instead calls ``broadcast_optimizer_state``,
    which on a fresh optimizer takes a zero-gradient step: AdamW's weight decay then moves weights.)
    """
    if not is_elastic():
        return LocalState(model, optimizer, **attrs)
    import copy

    from horovod.common.elastic import State

    from dtrain.checkpoint import snapshot

    class ElasticState(State):
        def __init__(self) -> None:
            self.model, self.optimizer = model, optimizer
            self._names = list(attrs)
            self.__dict__.update(attrs)
            super().__init__(bcast_object=_hvd.broadcast_object, get_rank=_hvd.rank)
            self.save()

        def _capture(self) -> dict[str, Any]:
            return {"model": snapshot(self.model.state_dict()), "optimizer": snapshot(self.optimizer.state_dict()),
                    "attrs": {k: getattr(self, k) for k in self._names}}

        def save(self) -> None:
            self._saved = self._capture()

        def restore(self) -> None:
            self.model.load_state_dict(self._saved["model"])
            self.optimizer.load_state_dict(copy.deepcopy(self._saved["optimizer"]))
            self.__dict__.update(self._saved["attrs"])

        def sync(self) -> None:
            self._saved = _hvd.broadcast_object(self._capture() if _hvd.rank() == 0 else None, root_rank=0,
                                                name="elastic-state")
            self.restore()

    return ElasticState()


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
