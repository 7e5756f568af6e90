"""One training step: the optimizer, forward and backward, the gradient combine, the step's counts.

``TrainStep`` is the step the loop calls and ``benchmarks/peers/dtrain_step.py`` times; ``Combine``
hides how the ranks' gradients become one (see its docstring). The order inside a step is fixed, and
the results depend on it bit for bit: learning rate, dropout seed, zero the gradients, forward and
backward, counts, stop vote, combine, clip, checkpoint fence, optimizer step, model average.

Written for a small model's step (~1 ms on CPU), where every avoidable operation shows (see
docs/performance.md): the step is plain attribute reads and calls, no per-step allocation.
"""

from __future__ import annotations

import array
import contextlib
import functools
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dtrain import dist, hier, models, shm
from dtrain.config import Config, Task
from dtrain.data.stream import Batch
from dtrain.sharded import ShardedOptimizer
from dtrain.train import regularize

log = logging.getLogger(__name__)


def make_optimizer(cfg: Config, params: Any) -> torch.optim.Optimizer:
    """The optimizer of ``cfg``, in torch's fused implementation where every parameter allows it.

    Fused: one kernel steps every parameter, where the default runs several tensor operations per
    parameter. Measured on one core for the 4.4 M parameters of a 2048-wide MLP: SGD with momentum
    2.0 ms a step against 3.0, AdamW 2.9 ms against 11-13 (benchmarks/allreduce_bench.py's ``t0`` is
    mostly this step). The state it keeps, and so checkpoints, are the same.
    """
    o = cfg.optim
    params = list(params)
    fused = True if _fusable(params) else None
    if o.optimizer == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov and o.momentum > 0,
                               weight_decay=o.weight_decay, fused=fused)
    if o.optimizer == "adam":
        return torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay, fused=fused)
    if o.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay, fused=fused)
    return torch.optim.Adagrad(params, lr=o.lr, weight_decay=o.weight_decay)


def shard_optimizer(cfg: Config, model: nn.Module, grads: list[torch.Tensor]) -> ShardedOptimizer | None:
    """The step sharded among this host's ranks over parameters they share (``dtrain/sharded.py``), where
    it applies: ``--shard``, shared memory carries the gradients (on one host, or on each of several
    with as many ranks, ``dtrain/hier.py``), they are summed at every step (not
    local SGD, Adasum or compressed) and every parameter is trained. None elsewhere (the whole step on
    every rank). Collective: every rank decides alike and sets up together."""
    group, o = dist.host_group(), cfg.optim
    if (group is None or not o.shard or cfg.train.sync_every > 1 or o.reduction != "sum" or o.compression != "none"
            or not grads or grads[0]._base is None):
        return None
    params = list(model.parameters())
    why = "frozen parameters" if not all(p.requires_grad for p in params) else \
        ShardedOptimizer.possible(params, grads[0]._base, group.size)
    if why is None and isinstance(group.cross, hier.CrossHost) and not group.cross.layout.uniform:
        # Hosts cutting different shards would round an element's update differently (sharded.py):
        # their copies of the parameters would drift apart by the last bits.
        why = "hosts with unequal numbers of ranks"
    if why is None:
        try:
            return ShardedOptimizer(group, params, grads[0]._base, lambda ps: make_optimizer(cfg, ps), o.grad_clip)
        except shm.Unavailable as e:  # every rank learns it at once: all step whole
            why = str(e)
    log.info("every rank takes the whole optimizer step: %s", why)
    return None


def _fusable(params: list[Any]) -> bool:
    """Whether torch's fused optimizers take ``params``: floating point, on the CPU or a CUDA device."""
    return bool(params) and all(
        isinstance(p, torch.Tensor) and p.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)
        and p.device.type in ("cpu", "cuda") for p in params)


def loss_sum(task: Task, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if task == "classification":
        return F.cross_entropy(out, y, reduction="sum")
    return F.mse_loss(out.squeeze(-1), y, reduction="sum")


def correct(task: Task, out: torch.Tensor, y: torch.Tensor) -> float:
    if task != "classification" or len(y) == 0:
        return 0.0
    # count_nonzero, not a sum of the booleans (which promotes to int64 first): the same count, and a
    # few microseconds less of a small model's ~1 ms step
    return float(out.argmax(dim=1).eq(y).count_nonzero())


@functools.lru_cache(maxsize=8)
def _loss_gradient(denominator: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # The gradient of ``loss / denominator`` with respect to ``loss``, computed by the very operation
    # the division's backward would run (``1 / denominator`` in ``dtype``), so the gradients are bit
    # for bit those of ``(loss / denominator).backward()``. Cached: most steps share one denominator.
    # autograd only reads it.
    return torch.ones((), dtype=dtype, device=device) / denominator


def forward_backward(model: nn.Module, batch: Batch, task: Task, micro_batches: int, denominator: int,
                     amp: str | None = None) -> tuple[float, float]:
    """Forward and backward over this rank's rows in ``micro_batches`` pieces (gradients accumulate).

    Returns the loss *sum* and the number of correct predictions (made before the update). ``amp``: the
    device type to run the forward pass in bfloat16 autocast on (``--amp``), None for float32.

    Written for a small model's step (~1 ms on CPU), where every avoidable operation shows: no
    ``tensor_split`` of a batch taken whole, no autocast context when it would be disabled, and the
    loss's backward seeded with ``1 / denominator`` instead of dividing the loss first (one operation
    fewer forward and one fewer backward, the same gradients).
    """
    total, right = 0.0, 0.0
    pieces: Iterable[tuple[torch.Tensor, torch.Tensor]] = (
        zip(batch.x.tensor_split(micro_batches), batch.y.tensor_split(micro_batches), strict=True)
        if micro_batches > 1 else ((batch.x, batch.y),))
    for x, y in pieces:
        with torch.autocast(amp, dtype=torch.bfloat16) if amp is not None else contextlib.nullcontext():
            out = model(x)
            loss = loss_sum(task, out.float(), y)
        loss.backward(_loss_gradient(denominator, loss.dtype, loss.device))
        total += loss.item()
        right += correct(task, out, y)
    return total, right


def step_seed(seed: int, global_step: int, rank: int) -> int:
    # Dropout's randomness is a function of (seed, step, rank): resuming needs no RNG state and
    # reproduces an uninterrupted run exactly.
    return (seed * 1_000_003 + global_step * 1_009 + rank) % (2**63)


class StepCounts:
    """The step's loss sum, correct predictions, rows and stop votes: float32 ``tensor``, which the
    step's allreduce carries (the tail of the gradient buffer when there is one).

    On CPU they are written and read as Python floats through a memoryview of the tensor's memory,
    with the float32 arithmetic of ``tensor.add_(torch.tensor([...]))`` (see ``add``): a few hundred
    nanoseconds a step, where the tensor operations cost ~30 us of a small model's ~1 ms step.
    Elsewhere (an accelerator), tensor operations.
    """

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor
        # float32 items, Python floats in and out (Any: typeshed has memoryview items as ints)
        self._host: Any = tensor.numpy().data if tensor.device.type == "cpu" else None
        self._f32 = array.array("f", [0.0])  # rounds a Python float to float32 (a C cast, as torch's)
        self._zeros = array.array("f", [0.0] * tensor.numel())

    def add(self, loss: float, right: float, rows: int) -> None:
        host, f32 = self._host, self._f32
        if host is None:
            self.tensor.add_(torch.tensor([loss, right, rows, 0.0], device=self.tensor.device))
            return
        for i, value in enumerate((loss, right, rows)):
            f32[0] = value  # rounded to float32, as torch.tensor([...]) rounds it
            # Two float32 values summed in double and rounded once to float32: the float32 sum
            # itself (double carries more than 2 * 24 + 2 bits), so exactly what add_ computes.
            f32[0] = host[i] + f32[0]
            host[i] = f32[0]

    def vote(self, stop: float) -> None:
        """This rank's vote to stop (summed across ranks by the allreduce)."""
        if self._host is not None:
            self._host[3] = stop
        else:
            self.tensor[3] = stop

    def take(self) -> tuple[float, float, float, float]:
        """The counts as they stand (after an allreduce: summed across ranks), zeroed for the next step."""
        counts = self._host.tolist() if self._host is not None else self.tensor.tolist()
        self.zero()
        loss, right, rows, votes = counts
        return loss, right, rows, votes

    def zero(self) -> None:
        if self._host is not None:
            self._host[:] = memoryview(self._zeros)
        else:
            self.tensor.zero_()


def gradient_buffers(params: Sequence[torch.Tensor], device: torch.device,
                     alone: bool = False) -> tuple[list[torch.Tensor], StepCounts]:
    """Attach a zeroed ``.grad`` to every parameter; return the gradients and the step's 4 counts.

    Every rank offers the same tensors to the allreduce, used or not. The gradients are views into
    one buffer whose tail holds the step's loss sum, correct predictions, rows and stop votes (as
    DDP's gradient_as_bucket_view): autograd accumulates into the views in place, and the step's one
    collective reduces the buffer as it is, with no packing copy.

    ``alone`` (a world of one for good, nothing to reduce): no gradient is attached, and the loop's
    ``zero_grad(set_to_none=True)`` lets autograd hand each parameter its fresh gradient, with no
    zeroing and no accumulation pass (~8% of a 2048-wide MLP's step on one core).
    """
    if alone:
        return [], StepCounts(torch.zeros(4, dtype=torch.float32, device=device))
    if params and all(p.dtype == torch.float32 and p.device == device for p in params):
        grads, counts = dist.flat_views(params, extra=4)
    else:  # mixed dtypes or devices: separate tensors, which the collective packs
        grads = [torch.zeros_like(p) for p in params]
        counts = torch.zeros(4, dtype=torch.float32, device=device)
    for p, g in zip(params, grads, strict=True):
        p.grad = g
    return grads, StepCounts(counts)


def seed_step(seed: int, device: torch.device) -> None:
    """Seed the generator dropout draws from on ``device`` for one step.

    Not ``torch.manual_seed``: that also queues a seed for every lazily initialised accelerator and
    formats a stack trace for it, ~150 us a call here, a few percent of a small model's step.
    """
    if device.type == "cuda":
        torch.cuda.default_generators[device.index or 0].manual_seed(seed)
    else:
        torch.default_generator.manual_seed(seed)


class Combine:
    """How the ranks' gradients become one, hidden from the loop.

    * **sum** (default): one fused allreduce of the gradients with the step's counts riding along
      (``--compression fp16``: the gradients travel in half precision, the counts not);
    * **adasum** (``--reduction adasum``): Adasum of the gradients, then the counts in a second collective;
    * **sharded** (one host, ``dtrain/sharded.py``): the sum happens inside ``optimizer.step()``, which
      stops at the reduce-scatter and steps this rank's shard;
    * **local SGD** (``--sync-every k``): no gradient collective; every k steps the models are averaged,
      the counts riding along.

    ``before_step`` and ``after_step`` return the seconds spent in collectives that combine the models,
    and ``syncs`` counts those collectives.
    """

    def __init__(self, cfg: Config, model: nn.Module, grads: list[torch.Tensor], counts: StepCounts,
                 sharded: ShardedOptimizer | None):
        self.compression = cfg.optim.compression
        self.adasum = cfg.optim.reduction == "adasum"
        self.local_sgd = cfg.train.sync_every > 1
        self.sharded = sharded
        self.grads, self.counts = grads, counts
        self.averaged = [t for t in model.state_dict().values() if t.is_floating_point()]  # local SGD
        # Each rank's loss is a sum over its rows divided by the rows its gradient stands for: the
        # whole global batch when gradients are summed across ranks, its own rows when each rank steps
        # alone (local SGD) or Adasum combines per-rank means.
        self.per_rank_mean = self.local_sgd or self.adasum
        self.syncs = 0  # collectives that combine the ranks' models (gradient allreduces or parameter averages)

    def check(self, device: torch.device) -> None:
        """Fail at start, not at the first step, where the combine cannot work (Adasum without MPI/NCCL)."""
        if self.adasum:
            dist.adasum_([torch.zeros(1, device=device)])

    def before_step(self) -> float:
        """The gradients' combine before the optimizer step (sum or Adasum); 0.0 where there is none."""
        if self.local_sgd or self.sharded is not None:
            return 0.0
        t0 = time.perf_counter()
        if self.adasum:
            dist.adasum_(self.grads)
            dist.allreduce_sum_([self.counts.tensor], name="counts")
        else:
            dist.allreduce_sum_(self.grads, compression=self.compression, uncompressed=[self.counts.tensor])
        self.syncs += 1
        return time.perf_counter() - t0

    def after_step(self, sync: bool, world: int) -> float:
        """Local SGD on a sync step: average the models (the counts ride along); 0.0 otherwise."""
        if not (self.local_sgd and sync):
            return 0.0
        t0 = time.perf_counter()
        dist.allreduce_sum_([*self.averaged, self.counts.tensor], name="average")
        for t in self.averaged:
            t.div_(world)
        self.syncs += 1
        return time.perf_counter() - t0


class TrainStep:
    """The model, its optimizer, gradient buffers and combine: one call is one optimizer step.

    Collective where the combine is: every rank builds it alike (same seed, same config).
    """

    def __init__(self, cfg: Config, model: nn.Module, task: Task, device: torch.device, alone: bool):
        self.model, self.task, self.device, self.alone = model, task, device, alone
        self.grad_clip = cfg.optim.grad_clip
        self.micro_batches = cfg.train.accumulate
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.grads, self.counts = gradient_buffers(self.params, device, alone)
        # One host: the ranks share one copy of the parameters, and each steps a shard (rank 0's
        # parameters are the shared ones); else every rank steps its own copy.
        self.sharded = shard_optimizer(cfg, model, self.grads)
        self.optimizer: Any = self.sharded or make_optimizer(cfg, model.parameters())
        if self.sharded is not None:
            log.info("the %d ranks of each host share the parameters and optimizer state; each steps a shard "
                     "of them", self.sharded.group_size)
        # --l1/--l2: penalties on the weights around each step (on this rank's shard when sharded).
        regularize.attach(self.optimizer, self.params, cfg.optim.l1, cfg.optim.l2)
        self.combine = Combine(cfg, model, self.grads, self.counts, self.sharded)
        # --amp: the forward pass in bfloat16 autocast (no loss scaling needed, unlike float16); on CPU
        # too, where it pays off on cores with bfloat16 instructions (AVX512-BF16, AMX).
        self.amp = device.type if cfg.train.amp else None
        # Seeding costs a few microseconds a step: skipped when the model draws no random numbers, as
        # nothing else in the loop does (the data order comes from the plan).
        self.random_forward = models.draws_random(model)

    def set_lr(self, lr: float) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = lr

    def __call__(self, batch: Batch, seed: int, sync: bool, stop_vote: Callable[[], float], world: int,
                 fence: Callable[[], float]) -> tuple[float, float]:
        """Train on ``batch``: returns the seconds in collectives and the seconds ``fence`` waited.

        ``seed``: dropout's seed for this step (``step_seed``); ``sync``: the counts (and with local SGD
        the models) are combined at this step, carrying this rank's ``stop_vote()`` (read after the
        backward pass, so that a signal that came during it counts at once); ``fence``: called before
        the parameters change (a checkpoint in flight copies them first).
        """
        if self.random_forward:
            seed_step(seed, self.device)
        self.optimizer.zero_grad(set_to_none=self.alone)
        combine = self.combine
        loss, right = forward_backward(self.model, batch, self.task, self.micro_batches,
                                       max(batch.rows, 1) if combine.per_rank_mean else batch.global_rows,
                                       self.amp)
        self.counts.add(loss, right, batch.rows)
        if sync:
            self.counts.vote(stop_vote())  # a signal on any rank stops every rank after this step
        seconds = combine.before_step()
        if self.grad_clip and self.sharded is None:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        # The checkpoint in flight has copied what it deferred (sharded: before any rank changes the
        # parameters they share, as no rank steps before every rank is here).
        waited = fence()
        t0 = time.perf_counter()
        self.optimizer.step()  # sharded: the gradients' sum with the counts, then this rank's shard
        if self.sharded is not None:
            combine.syncs += 1
            seconds += time.perf_counter() - t0
        seconds += combine.after_step(sync, world)
        return seconds, waited
