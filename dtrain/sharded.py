"""The optimizer step of one host's ranks, sharded among them, over parameters they share.

Data-parallel ranks hold the same parameters and take the same optimizer step. On one host, where
the ranks share the cores and the memory bus, each rank doing the whole update, on its own copy of the
parameters and of the optimizer's moments, repeats work and multiplies the memory traffic the step
is bound by. So, where shared memory carries the gradients (``dtrain.shm``):

* the trainable parameters are one tensor in shared memory that every rank's model views: one copy on
  the host, not one per rank;
* the gradient sum stops at the reduce-scatter: rank ``r`` gets the sum of shard ``r`` only and
  updates that shard of the parameters, with an optimizer of its own over the shard (ZeRO stage 1,
  Rajbhandari et al., SC'20), whose moments also live in shared memory. A barrier then marks every
  shard updated. There is no allgather: the other ranks' updates are in the memory every model reads;
* gradient clipping sums the shards' squared norms, one number per rank.

Across hosts with as many ranks each (``dtrain.hier``), the reduce-scatter also sums each shard over the
hosts, so every host holds one copy and steps it alike, bit for bit.

Measured on 2 cores with the 100-2048-2048-10 MLP, global batch 128 (docs/performance.md, B2 and B3):
2 ranks stepped 3,451 samples/s, where the previous release's run, with the whole update on every
rank, measured 2,928; and the host holds one copy of the parameters and moments instead of one per
rank.

The same update: the optimizers dtrain offers (SGD, Adam, AdamW, Adagrad) update each element from
that element's values alone, and the gradient shards are summed in rank order as the allreduce sums
them. Up to rounding only: torch's fused kernels round a tensor's vectorised body and its tail
differently, so an element cut into another tensor may differ in its last bit.

``state_dict()`` is the unsharded optimizer's, parameter by parameter (views of the shared moments,
no copy), and ``load_state_dict()`` takes one: checkpoints resume on any world size and transport.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from dtrain import shm

log = logging.getLogger(__name__)


class ShardedOptimizer:
    """An optimizer over ``params`` whose step sums the gradients and updates this rank's shard.

    ``params``: the model's parameters, all trainable, float32 on the CPU, equal on every rank (rank
    0's are kept); their ``.grad`` views tile ``buffer`` in order, and the rest of ``buffer`` (the
    step's counts) is summed in full by ``step``. ``make`` builds the torch optimizer for a list of
    parameters. Collective, as ``step`` and ``load_state_dict`` are: every rank calls them alike.

    Used as the torch optimizer it stands for: ``param_groups``, ``state``, ``zero_grad``, ``step``,
    ``state_dict``, ``load_state_dict``.
    """

    def __init__(self, group: shm.ShmGroup, params: Sequence[torch.nn.Parameter], buffer: torch.Tensor,
                 make: Callable[[list[torch.Tensor]], torch.optim.Optimizer], clip: float | None = None,
                 name: str = "sharded", key: str = "grads"):
        self._group, self._params, self._buffer, self._clip = group, list(params), buffer, clip
        # The buffer's channel: the allreduce's own (dtrain.dist sums it under "grads"), so that whole
        # steps after a failure here reuse the files already mapped, with no copy.
        self._key = key
        self._numel = sum(p.numel() for p in self._params)
        self._offsets = [sum(p.numel() for p in self._params[:i]) for i in range(len(self._params))]
        # Everything shared is made before the model changes: a full /dev/shm fails here, on every
        # rank alike, and leaves the parameters as they were (the caller then steps them whole).
        group.prepare(buffer, self._key)
        made: list[str] = []
        try:
            fill = torch.cat([p.detach().reshape(-1) for p in self._params]) if group.rank == 0 else None
            flat = group.shared(f"{name}-params", self._numel, torch.float32, fill)
            made.append(f"{name}-params")
            self._moments: dict[str, torch.Tensor] = {}  # state key -> the whole tensor in shared memory
            for k, dtype in _moment_keys(make).items():
                self._moments[k] = group.shared(f"{name}-{k}", self._numel, dtype)
                made.append(f"{name}-{k}")
        except shm.Unavailable:
            for key in made:
                group.unshare(key)
            raise
        for p, offset in zip(self._params, self._offsets, strict=True):
            p.data = flat[offset : offset + p.numel()].view_as(p)
        self._lo, self._hi = shm.shards(self._numel, group.size)[group.rank]
        self._shard = torch.nn.Parameter(flat[self._lo : self._hi])
        self._inner = make([self._shard])
        self._share_state()

    @staticmethod
    def possible(params: Sequence[torch.Tensor], buffer: torch.Tensor, size: int) -> str | None:
        """Why ``params`` cannot be sharded (a reason to log), or None when they can."""
        if not params or any(p.dtype != torch.float32 or p.device.type != "cpu" for p in params):
            return "parameters that are not all float32 on the CPU"
        numel = sum(p.numel() for p in params)
        if numel < size:
            return "fewer parameters than ranks"
        base, offset = buffer, 0
        for p in params:
            g = p.grad
            if g is None or g.untyped_storage().data_ptr() != base.untyped_storage().data_ptr() \
                    or g.storage_offset() != base.storage_offset() + offset or not g.is_contiguous():
                return "gradients that are not views of one buffer"
            offset += p.numel()
        return None if offset <= buffer.numel() else "a gradient buffer too small"

    # -- the torch optimizer's surface ---------------------------------------------------------------

    @property
    def group_size(self) -> int:
        """The ranks that share the parameters (this host's)."""
        return self._group.size

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self._inner.param_groups

    @property
    def shard(self) -> tuple[torch.optim.Optimizer, torch.Tensor, tuple[int, int]]:
        """This rank's optimizer, the shard it steps, and the shard's flat range ``[lo, hi)`` of the
        parameters laid end to end (what elementwise additions to the step, ``dtrain/train/regularize.py``,
        hook into)."""
        return self._inner, self._shard, (self._lo, self._hi)

    @property
    def state(self) -> Any:
        """The shard's state (its moments are views of the shared tensors)."""
        return self._inner.state

    def zero_grad(self, set_to_none: bool = False) -> None:
        """Zero every gradient, as one fill of the buffer (the counts after them are left alone)."""
        self._buffer[: self._numel].zero_()

    def step(self) -> None:
        """Sum the gradients over the ranks, clip them, update this rank's shard; return once every
        rank has updated its own. The counts at the buffer's end are then the ranks' sums."""
        group = self._group
        summed, _ = group.reduce_scatter_(self._buffer, self._key, self._numel)
        self._shard.grad = summed
        if self._clip is not None:
            # As clip_grad_norm_: the 2-norm of all gradients, scaled down to the limit when above it.
            total = math.sqrt(group.sum_scalar(self._key, float(torch.linalg.vector_norm(summed)) ** 2))
            factor = self._clip / (total + 1e-6)
            if not factor >= 1.0:  # NaN too: as clip_grad_norm_, a non-finite norm makes the gradients NaN
                summed.mul_(factor)
        self._inner.step()
        self._share_state()
        group.finish(self._key, self._buffer)

    def state_dict(self) -> dict[str, Any]:
        """The unsharded optimizer's state dict: per parameter, views of the shared moments."""
        inner = self._inner.state_dict()
        (hyper,) = inner["param_groups"]
        shard_state = self._inner.state.get(self._shard, {})
        state: dict[int, dict[str, Any]] = {}
        if shard_state:
            for i, (p, offset) in enumerate(zip(self._params, self._offsets, strict=True)):
                state[i] = {k: self._moments[k][offset : offset + p.numel()].view_as(p) if k in self._moments
                            else v.clone() if isinstance(v, torch.Tensor) else v  # e.g. the step count
                            for k, v in shard_state.items()}
        return {"state": state, "param_groups": [{**hyper, "params": list(range(len(self._params)))}]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load an unsharded optimizer's state dict (any world size's checkpoint). Collective."""
        groups = state_dict["param_groups"]
        if len(groups) != 1 or len(groups[0]["params"]) != len(self._params):
            raise ValueError(f"the optimizer state has {sum(len(g['params']) for g in groups)} parameters in "
                             f"{len(groups)} group(s), this model {len(self._params)} in 1")
        ids, saved = groups[0]["params"], state_dict["state"]
        shard_state: dict[str, Any] = {}
        if any(i in saved for i in ids):
            for k, v in saved[ids[0]].items():
                if k in self._moments:  # one value per element: this shard's
                    parts = [saved[i][k] for i in ids]
                    if any(t.numel() != p.numel() for t, p in zip(parts, self._params, strict=True)):
                        raise ValueError(f"the optimizer state {k!r} does not fit this model's parameters")
                    whole = torch.cat([t.reshape(-1) for t in parts])
                    shard_state[k] = whole[self._lo : self._hi].clone()
                else:  # e.g. the step count: a copy (torch's load may keep it, and step it in place)
                    shard_state[k] = v.clone() if isinstance(v, torch.Tensor) else v
        self._inner.load_state_dict({"state": {0: shard_state} if shard_state else {},
                                     "param_groups": [{**groups[0], "params": [0]}]})
        self._share_state()

    # -- the moments in shared memory ----------------------------------------------------------------

    def _share_state(self) -> None:
        """Move the shard's per-element state into the shared tensors, where rank 0 reads all of it at a
        checkpoint (torch makes the state at the first step, and anew at a load)."""
        state = self._inner.state.get(self._shard)
        if not state:
            return
        for k, v in state.items():
            if not isinstance(v, torch.Tensor) or v.shape != self._shard.shape:
                continue
            mine = self._moments[k][self._lo : self._hi]
            if v.data_ptr() != mine.data_ptr():
                mine.copy_(v)
                state[k] = mine


def _moment_keys(make: Callable[[list[torch.Tensor]], torch.optim.Optimizer]) -> dict[str, torch.dtype]:
    """The per-element state of the optimizers ``make`` builds (key -> dtype), found by stepping one
    over a parameter of two elements."""
    probe = torch.nn.Parameter(torch.zeros(2))
    probe.grad = torch.zeros(2)
    optimizer = make([probe])
    optimizer.step()
    return {k: v.dtype for k, v in optimizer.state[probe].items()
            if isinstance(v, torch.Tensor) and v.shape == probe.shape}
