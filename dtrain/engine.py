"""The training run: set up, one loop that reads top to bottom, evaluate, report.

Data-parallel in three marked places (the rest is a plain PyTorch loop):

1. every rank starts from rank 0's parameters (``dist.broadcast_parameters``; on one host, where the
   ranks share one copy of them, rank 0's are that copy);
2. each rank's loss is a *sum* over its rows divided by the rows of the whole global batch, and the
   gradients are *summed* across ranks, so the result is the mean over the global batch however the
   batch was cut (uneven last batches included) and equals what one process would compute;
3. the gradient sum, the loss and the accuracy counts travel in one fused allreduce per step; on one
   host, it stops at the reduce-scatter and each rank updates its shard of the shared parameters
   (``dtrain/sharded.py``, inside ``optimizer.step()``).
"""

from __future__ import annotations

import array
import contextlib
import datetime
import functools
import itertools
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import dtrain
from dtrain import dist, models, regularize, shm
from dtrain.checkpoint import model_sha256
from dtrain.cluster import connect
from dtrain.config import Config, UserError
from dtrain.coordinator import Coordinator
from dtrain.data import Dataset, Stats, data_format, follow_root, list_parquet, open_dataset, parquet_source
from dtrain.early_stop import Monitor
from dtrain.follow import Feed, FileEntry, FileInfo, arrival_order, new_files
from dtrain.plan import EpochPlan, Position, limited, steps_for_samples, validate_world
from dtrain.progress import Progress
from dtrain.rundir import RunDir
from dtrain.sharded import ShardedOptimizer
from dtrain.stream import Batch, Stream

log = logging.getLogger(__name__)


# -- building blocks ----------------------------------------------------------------------------------


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
    it applies: ``--shard``, shared memory carries the gradients, they are summed at every step (not
    local SGD, Adasum or compressed) and every parameter is trained. None elsewhere (the whole step on
    every rank). Collective: every rank decides alike and sets up together."""
    group, o = dist.host_group(), cfg.optim
    if (group is None or not o.shard or cfg.train.sync_every > 1 or o.reduction != "sum" or o.compression != "none"
            or not grads or grads[0]._base is None):
        return None
    params = list(model.parameters())
    why = "frozen parameters" if not all(p.requires_grad for p in params) else \
        ShardedOptimizer.possible(params, grads[0]._base, group.size)
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


def schedule_progress(cfg: Config, step: int, total_steps: int, start: tuple[int, float] = (0, 0.0)) -> float:
    """How far the schedule's decay stands at ``step``: 0 at the end of warm-up, 1 at ``total_steps``.

    ``start = (step0, progress0)``: the schedule was refitted at ``step0``, where it stood at
    ``progress0``, to a new ``total_steps`` (an elastic run with ``--batch-per-rank`` whose world
    changed, and with it the number of steps left); what is left of it, ``progress0`` to 1, is spread
    evenly over the steps from ``step0`` to ``total_steps``. Never refitted, ``start`` is ``(0, 0.0)``.
    """
    o = cfg.optim
    if step < o.warmup_steps:
        return 0.0
    step0, done = start
    begin = max(step0, o.warmup_steps)
    return done + (1 - done) * (step - begin) / max(1, total_steps - begin)


Schedule = tuple[int, float, int, int]  # (step0, progress0, total steps, global batch) it was fitted to


def refit_schedule(cfg: Config, step: int, schedule: Schedule, total_steps: int, global_batch: int) -> Schedule:
    """The LR schedule to follow from ``step`` on, for a run of ``total_steps`` steps of ``global_batch``.

    * Fitted to these already: unchanged.
    * The global batch changed mid-schedule (``--batch-per-rank``, the world changed): refitted at
      ``step`` from where it stands, so the rate moves on continuously and the decay still ends on the
      last step, however many steps remain at the new batch size.
    * Otherwise (a fresh run, or resumed with other ``--max-steps``, ``--epochs`` or data, or after
      the schedule had ended): fitted anew to ``total_steps`` from step 0, as a fixed-batch run does.
    """
    step0, done, fitted_total, fitted_batch = schedule
    if (fitted_total, fitted_batch) == (total_steps, global_batch):
        return schedule
    if fitted_batch in (0, global_batch) or step >= fitted_total:
        return 0, 0.0, total_steps, global_batch
    return step, min(1.0, schedule_progress(cfg, step, fitted_total, (step0, done))), total_steps, global_batch


def lr_factor(cfg: Config, step: int, total_steps: int, start: tuple[int, float] = (0, 0.0),
              epochs_trained: float = 0.0) -> float:
    """Multiplier of ``--lr`` at ``step``: linear warm-up, then the schedule (see ``schedule_progress``).

    ``epochs_trained``: rows trained so far over the training rows (the exponential schedule per epoch).
    """
    o = cfg.optim
    if step < o.warmup_steps:
        return (step + 1) / o.warmup_steps
    progress = schedule_progress(cfg, step, total_steps, start)
    if o.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    if o.schedule == "step":  # x0.1 at each third of training
        return 0.1 ** int(min(progress, 0.999) * 3)
    if o.schedule == "invscaling":  # online learning: lr / (1 + t)^power_t, t counted after warm-up
        return float((1 + step - o.warmup_steps) ** -o.power_t)
    if o.schedule == "exponential":
        # Counted in what does not change with the world: optimizer steps (as warm-up and --max-steps
        # are), or the data trained; so a world change needs no refit, and a resume continues exactly.
        return float(o.lr_decay ** (step - o.warmup_steps if o.decay_per == "step" else epochs_trained))
    return 1.0


def loss_sum(task: str, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if task == "classification":
        return F.cross_entropy(out, y, reduction="sum")
    return F.mse_loss(out.squeeze(-1), y, reduction="sum")


def correct(task: str, out: torch.Tensor, y: torch.Tensor) -> float:
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


def forward_backward(model: nn.Module, batch: Batch, task: str, micro_batches: int, denominator: int,
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


@dataclass
class Meter:
    """Running sums between two metrics lines."""

    loss: float = 0.0
    correct: float = 0.0
    rows: int = 0
    steps: int = 0
    data_wait: float = 0.0  # seconds the loop waited for the stream
    allreduce: float = 0.0  # seconds in collectives that combine the ranks' models
    checkpoint: float = 0.0  # seconds the loop was blocked by checkpoints
    since: float = field(default_factory=time.perf_counter)

    def timing(self, now: float) -> dict[str, float]:
        wall = max(now - self.since, 1e-9)
        return {"samples_per_sec": self.rows / wall, "data_stall": self.data_wait / wall,
                "allreduce_share": self.allreduce / wall, "checkpoint_seconds": self.checkpoint}

    def add(self, loss: float, correct: float, rows: int) -> None:
        self.loss += loss
        self.correct += correct
        self.rows += rows
        self.steps += 1


def timed(batches: Iterator[Batch], meter: Callable[[], Meter]) -> Iterator[Batch]:
    """``batches``, adding the time spent waiting for each one to the current meter."""
    while True:
        t0 = time.perf_counter()
        try:
            batch = next(batches)
        except StopIteration:
            return
        meter().data_wait += time.perf_counter() - t0
        yield batch


def evaluate(model: nn.Module, stream: Stream, sizes: list[int], cfg: Config, stats: Stats) -> dict[str, float]:
    """Held-out loss (and accuracy), combined across ranks by counts, not by averaging averages."""
    if sum(sizes) == 0:
        return {}
    plan = EpochPlan(tuple(sizes), cfg.train.eval_batch_size, shuffle=False)
    totals = np.zeros(4)  # loss sum, correct, rows, sum of squared deviation of targets (R²)
    y_dtype = np.dtype(np.int64 if stats.task == "classification" else np.float32)
    ys: list[torch.Tensor] = []
    model.eval()
    with torch.no_grad():
        for b in stream.batches(plan, y_dtype=y_dtype):
            out = model(b.x)
            totals[:3] += (float(loss_sum(stats.task, out, b.y)), correct(stats.task, out, b.y), b.rows)
            if stats.task == "regression":
                ys.append(b.y)
    model.train()
    result: dict[str, float] = {}
    if stats.task == "regression":
        y = torch.cat(ys) if ys else torch.zeros(0)
        s1, s2, n = dist.allreduce_sum([float(y.sum()), float((y.double() ** 2).sum()), len(y)])
        totals[3] = s2 - s1 * s1 / max(n, 1)
    loss, right, rows, ss_tot = dist.allreduce_sum(totals.tolist(), name="eval")
    result["eval_rows"] = rows
    result["eval_loss"] = loss / rows
    if stats.task == "classification":
        result["eval_accuracy"] = right / rows
    else:
        result["eval_r2"] = 1 - loss / ss_tot if ss_tot > 0 else float("nan")
    return result


def checkpoint_position(resumed: dict[str, Any]) -> Position:
    """A checkpoint's data position. Checkpoints written before the position had its row hold
    ``(epoch, step)`` of a plan cut with the global batch of the run that wrote them: the row follows."""
    pos = resumed["position"]
    if "row" in pos:
        return Position(**pos)
    train = resumed["config"]["train"]
    batch = train["batch_per_rank"] * resumed["world_size"] if train.get("batch_per_rank") \
        else train["global_batch_size"]
    return Position(pos["epoch"], pos["step"], pos["step"] * batch)


def _run_dir(cfg: Config) -> str:
    def choose() -> str:
        return cfg.run.run_dir or os.path.join("runs", datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))

    return dist.run_on_main(choose, name="run-dir")


# -- the run --------------------------------------------------------------------------------------------


def _check_elastic(cfg: Config) -> None:
    if not dist.is_elastic():
        return
    if cfg.cluster.scheduler is None:
        raise UserError("--scheduler: elastic runs need a Dask cluster that outlives any rank; start one "
                        "(launch/dask_cluster.sh) and pass --scheduler tcp://HOST:PORT")
    if cfg.run.run_dir is None:
        raise UserError("--run-dir: elastic runs need an explicit run directory, shared by all hosts")
    if cfg.data.follow:
        raise UserError("--follow: not supported with elastic runs yet; run it on a fixed world "
                        "(horovodrun -np N without --min-np/--max-np)")


def _check_follow(cfg: Config) -> None:
    """What --follow needs of --data, checked before any cluster starts."""
    if not cfg.data.follow:
        return
    assert cfg.data.data is not None
    source = follow_root(cfg.data.data)
    if data_format(cfg.data) != "parquet":
        raise UserError(f"--follow: --data {source!r} does not hold Parquet files; write the stream as "
                        "Parquet (.parquet) files")


def _open_data(cfg: Config, coord: Coordinator) -> tuple[Dataset, dict[str, Any] | None, list[FileInfo] | None]:
    """The dataset, the checkpoint to resume from (if any) and, with ``--follow``, the first files.

    A followed directory grows, so its dataset is the files present at the *first* start (listed by rank
    0, or recorded in the checkpoint): the statistics, the fingerprint and the row numbering stay those
    of the first run whatever landed since.
    """
    if not cfg.data.follow:
        dataset = open_dataset(cfg.data, cfg.train.seed)
        return dataset, coord.resume(dataset.token), None
    assert cfg.data.data is not None
    source = cfg.data.data
    resumed = coord.resume(None)  # the fingerprint is checked once the first files are known
    if resumed is not None and resumed.get("follow"):
        infos = [FileInfo(f.path, f.mtime, f.size) for f in Feed.from_dict(resumed["follow"]).segments[0]]
    else:
        infos = dist.run_on_main(lambda: arrival_order(list_parquet(source)), name="follow-list")
        if not infos:
            raise UserError(f"--follow: no Parquet files in {source!r} yet; the statistics come from the files "
                            "present at start: start once the first file has landed")
    identity = ["follow", source, [[f.path, f.size, f.mtime] for f in infos]]
    paths = [f.path for f in infos]
    dataset = Dataset(parquet_source(paths), cfg.data, cfg.train.seed, identity=identity, files=paths)
    coord.check_fingerprint(resumed, dataset.token)
    return dataset, resumed, infos


def run(cfg: Config) -> dict[str, Any]:
    t_start = time.perf_counter()
    dist.init()
    _check_elastic(cfg)
    _check_follow(cfg)
    elastic = dist.is_elastic()
    if dist.rank() != 0 and not cfg.run.verbose:  # only rank 0 reports; the others speak up for problems
        logging.getLogger("dtrain").setLevel(logging.WARNING)
    device = dist.device()
    online = cfg.train.mode == "online"
    seed = cfg.train.seed
    audit_name = f"worker-{os.getpid()}" if elastic else f"rank-{dist.rank()}"
    run_dir = RunDir(_run_dir(cfg), dist.is_main, cfg.data.audit_dir, audit_name)
    run_dir.write_config(cfg)
    coord = Coordinator(cfg, cfg.run.checkpoint_dir or run_dir.checkpoints)
    coord.install_signal_handlers()

    with connect(cfg.cluster) as client:
        # Data: statistics computed once by the cluster (rank 0 asks), the same numbers on every rank.
        dataset, resumed, first_files = _open_data(cfg, coord)
        if resumed is not None and resumed["stats"]["fingerprint"] == dataset.token:
            stats = Stats(**resumed["stats"])  # the very numbers the checkpoint was trained with
        else:  # a fresh run, or --force-resume onto different data: that data's own statistics
            stats = dist.run_on_main(dataset.compute_stats, name="stats")
        dataset.use_stats(stats)
        run_dir.write_json("stats.json", stats.to_dict())
        y_dtype = np.dtype(np.int64 if stats.task == "classification" else np.float32)
        # --follow: the files are read file by file, in segments (dtrain/follow.py); segment 0 is the
        # files present at the first start, the checkpoint knows the others.
        follow = cfg.data.follow
        feed: Feed | None = None
        if first_files is not None:
            if resumed is not None and resumed.get("follow"):
                feed = Feed.from_dict(resumed["follow"])
            else:
                feed = Feed()
                feed.add(dataset.first_files(first_files))
                feed.next_offset = stats.train_rows + stats.val_rows
        if feed is not None:
            train_parts, val_parts = dataset.file_partitions(feed.segments[0], "train"), []
        else:
            train_parts, val_parts = dataset.partitions("train"), dataset.partitions("val")

        # Model and optimizer: same seed everywhere, then (1) rank 0's parameters win.
        torch.manual_seed(seed)
        model = models.build(cfg.model, len(stats.features), stats.num_outputs).to(device)
        params = [p for p in model.parameters() if p.requires_grad]
        alone = not dist.is_distributed() and not elastic  # a world of one for good
        grads, counts = gradient_buffers(params, device, alone)
        # One host: the ranks share one copy of the parameters, and each steps a shard (rank 0's
        # parameters are the shared ones); else every rank steps its own copy.
        sharded = shard_optimizer(cfg, model, grads)
        optimizer: Any = sharded or make_optimizer(cfg, model.parameters())
        # --l1/--l2: penalties on the weights around each step (on this rank's shard when sharded).
        regularize.attach(optimizer, params, cfg.optim.l1, cfg.optim.l2)
        if sharded is not None:
            log.info("the %d ranks share the parameters and optimizer state; each steps a shard of them",
                     dist.size())
        epochs = 1 if online else cfg.train.epochs

        # Global batch fixed by default (no LR change when the world changes); --batch-per-rank opts
        # into a per-rank batch with the linear scaling rule, so the global batch and the LR follow
        # the world (and change with it in elastic runs).
        batch_per_rank = cfg.train.batch_per_rank

        def global_batch_for(world: int) -> int:
            return batch_per_rank * world if batch_per_rank else cfg.train.global_batch_size

        def plan(at: Position, global_batch: int) -> EpochPlan:
            """The rest of ``at``'s epoch (--follow: of its segment, the files read at one poll) in
            batches of ``global_batch`` (the whole epoch from its start)."""
            sizes = feed.train_sizes(at.epoch) if feed is not None else stats.train_sizes
            return EpochPlan.at(at, tuple(sizes), global_batch, seed,
                                shuffle=cfg.data.shuffle and not online, shuffle_window=cfg.data.shuffle_window,
                                drop_last=cfg.data.drop_last and not follow)

        max_samples = cfg.train.max_samples

        def steps_left(here: Position, global_batch: int, samples: int) -> int:
            """Optimizer steps from ``here`` to the end of the epochs (or of --max-samples), at
            ``global_batch`` rows a step, ``samples`` rows trained so far."""
            steps, budget = 0, None if max_samples is None else max_samples - samples
            for epoch in range(here.epoch, epochs):
                rest = limited(plan(here if epoch == here.epoch else Position(epoch), global_batch), budget)
                steps += rest.num_steps - rest.start_step
                if budget is not None:
                    budget -= rest.trained_rows
                    if budget <= 0:
                        break
            return steps

        # What a rollback restores and a joining rank receives: the model, the optimizer and where
        # training stands. The data position is (epoch, step, row): row, the epoch's next untrained row
        # in the plan's order, holds whatever the global batch (see dtrain/plan.py); schedule is what
        # the LR schedule was fitted to (see refit_schedule).
        # early/best_model (--early-stop): the monitor's dict and the best model, replaced, never mutated,
        # so that a commit keeps its moment's (dtrain/early_stop.py).
        state = dist.training_state(model, optimizer, epoch=0, step=0, row=0, global_step=0, samples=0,
                                    schedule=(0, 0.0, 0, 0), early=None, best_model=None)
        if resumed is not None:
            try:
                # Sharded, every rank writes the same bytes into the one shared copy: loading on rank 0
                # alone would let another rank's first forward pass read it half loaded.
                model.load_state_dict(resumed["model"])
                optimizer.load_state_dict(resumed["optimizer"])
            except (RuntimeError, ValueError, KeyError) as e:
                raise UserError(f"--resume: the checkpoint's model does not fit this model and data "
                                f"({str(e).splitlines()[0]}); use the same --model flags, or --resume never") from None
            pos = checkpoint_position(resumed)
            if pos.epoch < (len(feed.segments) if feed is not None else epochs):
                epoch_rows = plan(Position(pos.epoch), 1).num_rows
                if pos.row > epoch_rows or plan(pos, global_batch_for(dist.size())).num_steps <= pos.step:
                    pos = Position(pos.epoch + 1)  # the epoch is over (or forced onto smaller data)
            state.epoch, state.step, state.row = pos.epoch, pos.step, pos.row
            state.global_step, state.samples = resumed["global_step"], resumed["samples"]
            state.schedule = tuple(resumed.get("schedule", state.schedule))
            state.early, state.best_model = resumed.get("early_stop"), resumed.get("best_model")
            state.save()  # the checkpoint is the first commit (save: a commit's host check is a collective)
        averaged = [t for t in model.state_dict().values() if t.is_floating_point()]  # local SGD
        local_sgd, adasum = cfg.train.sync_every > 1, cfg.optim.reduction == "adasum"
        # --amp: the forward pass in bfloat16 autocast (no loss scaling needed, unlike float16); on CPU
        # too, where it pays off on cores with bfloat16 instructions (AVX512-BF16, AMX).
        amp = device.type if cfg.train.amp else None
        # Seeding costs a few microseconds a step: skipped when the model draws no random numbers, as
        # nothing else in the loop does (the data order comes from the plan).
        random_forward = models.draws_random(model)

        def trainer_state() -> dict[str, Any]:
            return {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "position": {"epoch": state.epoch, "step": state.step, "row": state.row},
                    "global_step": state.global_step, "samples": state.samples, "schedule": list(state.schedule),
                    "early_stop": state.early, "best_model": state.best_model,
                    "stats": stats.to_dict(), "config": cfg.to_dict(),
                    "world_size": dist.size(), "follow": feed.to_dict() if feed is not None else None,
                    "versions": {"dtrain": dtrain.__version__, "torch": torch.__version__}}

        def train(state: Any) -> dict[str, Any]:
            """The loop, from wherever ``state`` stands. Elastic runs re-enter it after every world change,
            with ``state`` rolled back to the last commit (a rank failed) or as committed (hosts changed)."""
            rank, world = dist.rank(), dist.size()
            dist.configure_threads()  # the ranks on this host may have changed
            try:
                validate_world(stats.train_rows, world)
            except ValueError as e:
                raise UserError(f"--data: {e}") from None
            if adasum:
                dist.adasum_([torch.zeros(1, device=device)])  # fail at start, not at the first step
            global_batch = global_batch_for(world)
            lr_scale = world if batch_per_rank else 1
            steps_per_epoch = plan(Position(), global_batch).num_steps
            if follow:  # how long training lasts is unknown (the schedules that need it require --max-steps)
                total_steps = cfg.train.max_steps or 2**62
                state.schedule = (0, 0.0, total_steps, global_batch)
            elif batch_per_rank:
                # The global batch is this world's, and may differ from the one the run began with: count
                # the steps that remain at this size. --max-steps counts optimizer steps, whatever their
                # size. On a world change the LR schedule is refitted to the new total from where it
                # stands (continuous, ending on the last step; refit_schedule); warm-up counts
                # optimizer steps.
                here = Position(state.epoch, state.step, state.row)
                total_steps = min(cfg.train.max_steps or 2**62,
                                  state.global_step + steps_left(here, global_batch, state.samples))
                state.schedule = refit_schedule(cfg, state.global_step, state.schedule, total_steps, global_batch)
            else:
                total_steps = min(cfg.train.max_steps or 2**62,
                                  steps_for_samples(plan(Position(), global_batch), epochs, max_samples))
                state.schedule = (0, 0.0, total_steps, global_batch)
            schedule_start = state.schedule[:2]
            if not elastic:  # elastic runs: state.sync() did this
                dist.broadcast_parameters(model, buffers_only=sharded is not None)

            def stream(parts: list[Any]) -> Stream:
                return Stream(client, parts, len(stats.features), rank, world, cfg.data.prefetch, device)

            train_stream = stream(train_parts)
            log.info("rank %d/%d: %d train rows in %d partitions, global batch %d, %d steps/epoch, %d epochs, "
                     "from step %d, run dir %s", rank, world, stats.train_rows, len(stats.train_sizes), global_batch,
                     steps_per_epoch, epochs, state.global_step, run_dir.path)
            meter, total = Meter(), Meter()  # since the last metrics line; since this (re)start
            progress = Progress(dist.is_main(), cfg.run.progress_seconds)
            last_loss = float("nan")
            final_eval: dict[str, float] | None = None  # the last evaluation, while still current
            counts.zero()  # a reset may have left a rolled-back step's sums
            syncs = 0  # collectives that combine the ranks' models (gradient allreduces or parameter averages)
            stop = False
            idle = False  # --follow: stopped by --idle-timeout
            early_stopped = False  # --early-stop: the monitored metric stopped improving

            def current_meter() -> Meter:
                return meter

            def checkpoint(sync: bool = False) -> None:
                t0 = time.perf_counter()
                meta = {"epoch": state.epoch, "position_step": state.step, "position_row": state.row,
                        "world_size": world}
                coord.save(state.global_step, trainer_state, meta, sync=sync, defer=only_stepped())
                meter.checkpoint += time.perf_counter() - t0

            def only_stepped() -> Callable[[torch.Tensor], bool]:
                """Tensors that only ``optimizer.step()`` changes (parameters, optimizer state): an async
                checkpoint copies them while the next forward and backward run, fenced before the step.
                Buffers (e.g. batch-norm statistics) change in the forward pass: copied at once."""
                # By storage: sharded, the state dict's tensors are views of the shared ones.
                ptrs = {p.untyped_storage().data_ptr() for p in params} | {
                    v.untyped_storage().data_ptr() for st in optimizer.state.values() for v in st.values()
                    if isinstance(v, torch.Tensor)}
                return lambda t: t.numel() > 0 and t.untyped_storage().data_ptr() in ptrs

            def files_done() -> int:
                assert feed is not None
                return feed.files_done(state.epoch, state.row)

            def wait_for_files(feed: Feed) -> str | None:
                """Poll ``--data`` until new files land (then a segment of them is added to ``feed``), or
                say why to stop instead: ``"signal"`` (SIGTERM/SIGINT on some rank) or ``"idle"``.

                Every rank naps in short sleeps, so a signal is noticed at once, then all vote on stopping
                and take rank 0's listing: every rank sees the same files at the same step.
                """
                assert cfg.data.data is not None
                source, timeout = cfg.data.data, cfg.data.idle_timeout
                since = time.monotonic()
                log.info("waiting for new files in %s%s", source,
                         f" (stopping after {timeout:g} s without any)" if timeout is not None else "")

                def poll() -> list[FileEntry] | None:
                    try:
                        listing = list_parquet(source)
                    except UserError as e:  # e.g. an object store's hiccup: the next poll tries again
                        log.warning("%s; trying again in %g s", e, cfg.data.poll_interval)
                        listing = []
                    found = new_files(listing, feed.known)
                    if found:
                        return dataset.new_files(found, feed.next_offset)
                    return None if timeout is not None and time.monotonic() - since >= timeout else []

                for attempt in itertools.count():
                    if attempt:
                        deadline = time.monotonic() + cfg.data.poll_interval
                        while coord.signal is None and time.monotonic() < deadline:
                            time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
                    if dist.allreduce_sum([coord.stop_flag], name="follow-stop")[0] > 0:
                        return "signal"
                    try:
                        entries = dist.run_on_main(poll, name="follow-poll")
                    except UserError:  # a bad file: save what was learnt, so that the rerun resumes here
                        checkpoint(sync=True)
                        raise
                    if entries is None:
                        return "idle"
                    if entries:
                        feed.add(entries)
                        log.info("%d new file(s), %d rows: %s", len(entries), sum(e.rows for e in entries),
                                 ", ".join(os.path.basename(e.path) for e in entries[:5])
                                 + (", ..." if len(entries) > 5 else ""))
                        return None
                raise AssertionError("unreachable")

            model.train()
            # ---- the loop --------------------------------------------------------------------------
            # --follow: each "epoch" is a segment (the files one poll found), and the loop waits for the
            # next one at the end of the last; otherwise epochs as usual.
            for epoch in itertools.count(state.epoch) if follow else range(state.epoch, epochs):
                if state.global_step >= total_steps or (max_samples is not None and state.samples >= max_samples):
                    break
                if Monitor.resume(cfg.train.monitor, cfg.train.early_stop, state.early).should_stop:
                    early_stopped = True  # resumed after --early-stop ended the run: it stays ended
                    break
                if feed is not None and epoch >= len(feed.segments):
                    waited = wait_for_files(feed)
                    stop, idle = waited == "signal", waited == "idle"
                    if waited is not None:
                        break
                    if not meter.rows:  # rates count from here, not from before the wait
                        meter = Meter()
                at = Position(epoch, state.step, state.row) if epoch == state.epoch else Position(epoch)
                left = None if max_samples is None else max_samples - state.samples
                epoch_plan = limited(plan(at, global_batch), left)
                if feed is not None and epoch > 0:
                    train_stream = stream(dataset.file_partitions(feed.segments[epoch], "train"))
                progress.start_epoch(epoch, epoch_plan.num_steps, at.step)
                batch: Batch
                # The next epoch's first partitions are prepared while this one ends (not --follow:
                # its next segment is other files, maybe not there yet).
                then = plan(Position(epoch + 1), global_batch) if feed is None and epoch + 1 < epochs else None
                for batch in timed(train_stream.batches(epoch_plan, y_dtype=y_dtype, then=then), current_meter):
                    for g in optimizer.param_groups:
                        g["lr"] = cfg.optim.lr * lr_scale * lr_factor(cfg, state.global_step, total_steps,
                                                                       schedule_start,
                                                                       state.samples / stats.train_rows)
                    if random_forward:
                        seed_step(step_seed(seed, state.global_step, rank), device)
                    optimizer.zero_grad(set_to_none=alone)
                    # (2) This rank's loss is a sum over its rows divided by the rows its gradient stands
                    # for: the whole global batch when gradients are summed across ranks, its own rows
                    # when each rank steps alone (local SGD) or Adasum combines per-rank means.
                    per_rank = local_sgd or adasum
                    loss, right = forward_backward(model, batch, stats.task, cfg.train.accumulate,
                                                   max(batch.rows, 1) if per_rank else batch.global_rows, amp)
                    counts.add(loss, right, batch.rows)
                    # --follow: every segment ends with a sync, so that waiting for files (and stopping
                    # after the wait) finds the ranks with the same model.
                    last_of_epoch = batch.step + 1 == epoch_plan.num_steps
                    sync = not local_sgd or (state.global_step + 1) % cfg.train.sync_every == 0 \
                        or state.global_step + 1 >= total_steps or (last_of_epoch and (follow or epoch_plan.cut))
                    if sync:
                        counts.vote(coord.stop_flag)  # a signal on any rank stops every rank after this step
                    if not local_sgd and sharded is None:
                        # (3) one fused collective: gradients + loss + counts (Adasum needs a second one).
                        t_sync = time.perf_counter()
                        if adasum:
                            dist.adasum_(grads)
                            dist.allreduce_sum_([counts.tensor], name="counts")
                        else:
                            dist.allreduce_sum_(grads, compression=cfg.optim.compression, uncompressed=[counts.tensor])
                        syncs += 1
                        meter.allreduce += time.perf_counter() - t_sync
                    if cfg.optim.grad_clip and sharded is None:
                        torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
                    # The checkpoint in flight has copied what it deferred (sharded: before any rank
                    # changes the parameters they share, as no rank steps before every rank is here).
                    meter.checkpoint += coord.fence()
                    t_sync = time.perf_counter()
                    optimizer.step()  # sharded: (3) the gradients' sum with the counts, then this rank's shard
                    if sharded is not None:
                        syncs += 1
                        meter.allreduce += time.perf_counter() - t_sync
                    if local_sgd and sync:
                        # (3') local SGD: average the models every k steps, counts riding along.
                        t_sync = time.perf_counter()
                        dist.allreduce_sum_([*averaged, counts.tensor], name="average")
                        for t in averaged:
                            t.div_(world)
                        syncs += 1
                        meter.allreduce += time.perf_counter() - t_sync

                    state.global_step += 1
                    state.samples += batch.global_rows
                    after = epoch_plan.position_after(batch.step)
                    state.epoch, state.step, state.row = after.epoch, after.step, after.row
                    final_eval = None
                    if run_dir.audit:
                        run_dir.audit_rows(rank, epoch, batch.step, batch.row_id)
                    if sync:
                        loss_sum_, right_, rows_, votes = counts.take()
                        meter.add(loss_sum_, right_, int(rows_))
                        total.add(loss_sum_, right_, int(rows_))
                        stop = votes > 0
                    if meter.rows and (state.global_step % cfg.train.log_every == 0
                                       or state.global_step == total_steps or (follow and last_of_epoch)):
                        last_loss = meter.loss / meter.rows
                        record = {"step": state.global_step, "time": time.time(), "epoch": epoch,
                                  "samples": state.samples,
                                  "loss": last_loss, "lr": optimizer.param_groups[0]["lr"], "world_size": world,
                                  "global_batch": global_batch,
                                  "syncs": syncs, **meter.timing(time.perf_counter())}
                        if stats.task == "classification":  # online: each row predicted before trained on
                            record["progressive_accuracy" if online else "accuracy"] = meter.correct / meter.rows
                        if feed is not None:
                            record["files"] = files_done()
                        run_dir.metrics(record)
                        progress.update(batch.step + 1, last_loss, record["samples_per_sec"])
                        meter = Meter()
                    if stop or state.global_step >= total_steps:
                        break
                    if sync and elastic and state.global_step % cfg.train.commit_every == 0:
                        # (4) elastic: a commit to memory, also where changed hosts are noticed.
                        state.commit()
                    if sync and coord.due(state.global_step):  # after a sync every rank holds the same model
                        checkpoint()
                else:  # the plan ran out: the next epoch starts at its first row, unless --max-samples cut
                    # this one short (training then stands at the cut row, where a larger limit goes on)
                    if not epoch_plan.cut:
                        state.epoch, state.step, state.row = epoch + 1, 0, 0
                progress.close()
                if stop:
                    break
                if not online:
                    final_eval = evaluate(model, stream(val_parts), stats.val_sizes, cfg, stats)
                    if final_eval:
                        run_dir.metrics({"step": state.global_step, "epoch": epoch, "world_size": world,
                                         **final_eval})
                        log.info("epoch %d: %s", epoch, " ".join(f"{k}={v:.4g}" for k, v in final_eval.items()))
                    if final_eval and cfg.train.early_stop is not None and state.epoch > epoch:
                        # --early-stop: watch the metric at each epoch's end (not at a cut by --max-steps,
                        # which a resume would not repeat), keep the best model (dtrain/early_stop.py)
                        monitor = Monitor.resume(cfg.train.monitor, cfg.train.early_stop, state.early)
                        monitor = monitor.update(final_eval, state.global_step)
                        state.early = monitor.to_dict()
                        if monitor.improved:
                            state.best_model = {k: v.detach().clone() for k, v in model.state_dict().items()}
                        if monitor.should_stop:
                            early_stopped = True
                            log.info("early stop: %s has not improved for %d evaluations (best %.4g at step %d)",
                                     monitor.metric, monitor.waited, monitor.best, monitor.best_step)
                            break
            # ---- end of the loop -------------------------------------------------------------------

            if meter.rows:
                last_loss = meter.loss / meter.rows
            if stop:  # stopped by a signal: save where we are and leave, resumable with the same command
                status = coord.save_and_stop(lambda: checkpoint(sync=True))
                log.warning("stopped at step %d; checkpoint saved in %s", state.global_step, coord.location)
                run_dir.close()
                raise SystemExit(status)
            if final_eval is None:
                if feed is not None:  # every file's held-out rows, the files read at start and since
                    entries = [f for seg in feed.segments for f in seg]
                    final_eval = evaluate(model, stream(dataset.file_partitions(entries, "val")),
                                          [f.val for f in entries], cfg, stats)
                else:
                    final_eval = evaluate(model, stream(val_parts), stats.val_sizes, cfg, stats)
            checkpoint(sync=True)
            hashes = dist.allgather_object(model_sha256(model.state_dict()), name="model-hash")
            result = {
                "final_loss": last_loss, "eval_loss": final_eval.get("eval_loss"),
                "eval_accuracy": final_eval.get("eval_accuracy"), "eval_r2": final_eval.get("eval_r2"),
                "model_sha256": hashes[0], "ranks_identical": len(set(hashes)) == 1, "syncs": syncs,
                "world_size": world, "sharded_step": sharded is not None,
            }
            if early_stopped:
                result["stop_reason"] = "early_stop"
            elif max_samples is not None and state.samples >= max_samples:
                result["stop_reason"] = "max_samples"
            elif cfg.train.max_steps is not None and state.global_step >= cfg.train.max_steps:
                result["stop_reason"] = "max_steps"
            elif idle:
                result["stop_reason"] = "idle_timeout"
            else:
                result["stop_reason"] = "end_of_data" if online else "epochs"
            if feed is not None:
                result.update(files_consumed=files_done(), files_seen=feed.num_files)
            if online and stats.task == "classification" and total.rows:
                result["progressive_accuracy"] = total.correct / total.rows
                result["progressive_loss"] = total.loss / total.rows
            return result

        failure, _ = dist.elastic_resets() or (None, None)
        entry_rank = [dist.rank()]

        def train_and_save_on_reset(state: Any) -> dict[str, Any]:
            """``train``, but a world change first puts the last commit on disk (by the rank that was 0):
            if the new world never forms (``--min-np`` not met), horovodrun ends the job, and the
            rerun resumes from here instead of from the last periodic checkpoint."""
            entry_rank[0] = dist.rank()
            try:
                return train(state)
            except dist.elastic_resets() as e:
                coord.fence()  # Horovod's restore and sync overwrite the parameters next
                if entry_rank[0] == 0:
                    if failure is not None and isinstance(e, failure):
                        state.restore()  # mid-step: back to the commit (Horovod restores again, harmlessly)
                    meta = {"epoch": state.epoch, "position_step": state.step, "position_row": state.row,
                            "reason": "world change"}
                    coord.save(state.global_step, trainer_state, meta, sync=True, force=True)
                raise

        outcome = dist.run_elastic(train_and_save_on_reset, state)
        coord.restore_signal_handlers()
        coord.close()

    wall = time.perf_counter() - t_start
    summary = {
        "steps": state.global_step, "epochs": 1 if cfg.data.follow else state.epoch + (state.step > 0),
        "samples": state.samples,
        "world_size": outcome.pop("world_size"), "wall_seconds": wall, "samples_per_sec": state.samples / wall,
        "mode": cfg.train.mode, "task": stats.task, **outcome,
        "zero_weights": regularize.zero_share(list(model.parameters())),  # --l1's exact zeros
    }
    if state.best_model is not None:  # --early-stop: model.pt is the best evaluated model
        summary.update(best_step=state.early["best_step"], best_value=state.early["best"],
                       monitor=state.early["metric"])
        run_dir.save_model(state.best_model)
        run_dir.save_model(model.state_dict(), "model-last.pt")
    else:
        run_dir.save_model(model.state_dict())
    run_dir.write_json("summary.json", summary)
    run_dir.close()
    if dist.is_main():
        log.info("done: %s", json.dumps({k: v for k, v in summary.items() if k != "model_sha256"}))
    return summary
