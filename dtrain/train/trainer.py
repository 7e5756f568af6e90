"""The training run as an object: set up (``__init__``, ``fit``'s first half), the loop (``fit``), ``finish``.

Read top to bottom, ``Trainer`` is the run: the data and its statistics (``_setup_data``), the model and
its step (``_setup_model``, ``dtrain/train/step.py``), where training stands (``state_dict`` /
``load_state_dict``: the single description of what a checkpoint and an elastic commit hold), then the
loop: epochs (``_fit_epochs``), steps (``_fit_epoch``), one step (``_train_step``). Each decision a step
takes (sync, log, commit, checkpoint, stop, and why a run stopped) is asked of the coordinator's pure
policy (``dtrain/policy.py``); the trainer acts on the answers. Models know nothing of distribution.

Data-parallel in three marked places (the rest is a plain PyTorch loop):

1. every rank starts from rank 0's parameters (``dist.broadcast_parameters``; on one host, where the
   ranks share one copy of them, rank 0's are that copy);
2. each rank's loss is a *sum* over its rows divided by the rows of the whole global batch, and the
   gradients are *summed* across ranks, so the result is the mean over the global batch however the
   batch was cut (uneven last batches included) and equals what one process would compute;
3. the gradient sum, the loss and the accuracy counts travel in one fused allreduce per step; on one
   host, it stops at the reduce-scatter and each rank updates its shard of the shared parameters
   (``dtrain/sharded.py``, inside ``optimizer.step()``). ``Combine`` in ``step.py`` hides which.

Elastic runs (4) re-enter ``_train`` after every world change, with the state rolled back to the last
commit (a rank failed) or as committed (hosts changed): what depends on the world is set up there.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

import dtrain
from dtrain import dist, elastic, evaldata, models
from dtrain.cluster import connect, reconnect
from dtrain.config import Config
from dtrain.coordinator import Coordinator
from dtrain.data.dataset import Stats
from dtrain.data.follow import Feed, FileWaiter
from dtrain.data.plan import EpochPlan, Position, limited, validate_world
from dtrain.data.sources import list_parquet
from dtrain.data.stream import Batch, Stream
from dtrain.errors import UserError
from dtrain.policy import Divergence, StepPolicy, scheduler_wait
from dtrain.progress import Progress
from dtrain.rundir import RunDir
from dtrain.storage import ClusterLost
from dtrain.train import ending
from dtrain.train.early_stop import Monitor
from dtrain.train.evaluate import evaluate
from dtrain.train.meter import Meter, timed
from dtrain.train.schedule import checkpoint_position, fit_schedule, lr_factor
from dtrain.train.setup import check_elastic, check_follow, open_data, run_dir_path
from dtrain.train.step import TrainStep, step_seed

log = logging.getLogger(__name__)

# Seconds of one round of waiting for a lost Dask scheduler, between the ranks' allreduces.
WAIT_ROUND = 1.0


class Trainer:
    """One training run; ``Trainer(cfg).fit()`` is ``python -m dtrain``."""

    # -- set-up -------------------------------------------------------------------------------------

    def __init__(self, cfg: Config):
        self.t_start = time.perf_counter()
        dist.init()
        check_elastic(cfg)
        check_follow(cfg)
        self.cfg = cfg
        self.elastic = dist.is_elastic()
        if dist.rank() != 0 and not cfg.run.verbose:  # only rank 0 reports; the others speak up for problems
            logging.getLogger("dtrain").setLevel(logging.WARNING)
        self.device = dist.device()
        self.online = cfg.train.mode == "online"
        self.follow = cfg.data.follow
        self.seed = cfg.train.seed
        self.epochs = 1 if self.online else cfg.train.epochs
        self.max_samples = cfg.train.max_samples
        audit_name = f"worker-{os.getpid()}" if self.elastic else f"rank-{dist.rank()}"
        self.run_dir = RunDir(run_dir_path(cfg), dist.is_main, cfg.data.audit_dir, audit_name)
        self.coord = Coordinator(cfg, cfg.run.checkpoint_dir or self.run_dir.checkpoints)
        # Both locations take a write before any data is read (dtrain/storage.py).
        dist.run_on_main(lambda: self.coord.preflight(self.run_dir.path), name="preflight")
        self.run_dir.write_config(cfg)
        self.coord.install_signal_handlers()

    def _setup_data(self) -> dict[str, Any] | None:
        """The dataset, its statistics and (--follow) its files; returns the checkpoint to resume from."""
        cfg = self.cfg
        # Statistics computed once by the cluster (rank 0 asks), the same numbers on every rank.
        dataset, resumed, first_files = open_data(cfg, self.coord)
        if resumed is not None and resumed["stats"]["fingerprint"] == dataset.token:
            stats = Stats(**resumed["stats"])  # the very numbers the checkpoint was trained with
        else:  # a fresh run, or --force-resume onto different data: that data's own statistics
            stats = dist.run_on_main(dataset.compute_stats, name="stats")
        dataset.use_stats(stats)
        self.run_dir.write_json("stats.json", stats.to_dict())
        self.dataset, self.stats = dataset, stats
        self.y_dtype = np.dtype(np.int64 if stats.task == "classification" else np.float32)
        # --follow: the files are read file by file, in segments (dtrain/data/follow.py); segment 0 is the
        # files present at the first start, the checkpoint knows the others.
        self.feed: Feed | None = None
        if first_files is not None:
            if resumed is not None and resumed.get("follow"):
                self.feed = Feed.from_dict(resumed["follow"])
            else:
                self.feed = Feed()
                self.feed.add(dataset.first_files(first_files))
                self.feed.next_offset = stats.train_rows + stats.val_rows
        if self.feed is not None:
            self.train_parts, self.val_parts = dataset.file_partitions(self.feed.segments[0], "train"), []
        else:
            self.train_parts, self.val_parts = dataset.partitions("train"), dataset.partitions("val")
        self.val_sizes = stats.val_sizes
        if cfg.data.eval_data:  # --eval-data: a separate evaluation set, with the training statistics
            self.val_parts, self.val_sizes = evaldata.partitions(cfg, stats)
        return resumed

    def _setup_model(self) -> None:
        """Model, optimizer and step: same seed everywhere, then (1) rank 0's parameters win (``_train``)."""
        torch.manual_seed(self.seed)
        self.model = models.build(self.cfg.model, len(self.stats.features), self.stats.num_outputs).to(self.device)
        alone = not dist.is_distributed() and not self.elastic  # a world of one for good
        self.step = TrainStep(self.cfg, self.model, self.stats.task, self.device, alone)
        # What a rollback restores and a joining rank receives: the model, the optimizer and where
        # training stands. The data position is (epoch, step, row): row, the epoch's next untrained row
        # in the plan's order, holds whatever the global batch (see dtrain/data/plan.py); schedule is
        # what the LR schedule was fitted to (see refit_schedule).
        self.state = elastic.training_state(self.model, self.step.optimizer, epoch=0, step=0, row=0, global_step=0,
                                         samples=0, schedule=(0, 0.0, 0, 0), early=None, best_model=None)
        # early/best_model (--early-stop): the monitor's dict and the best model, replaced, never mutated,
        # so that a commit keeps its moment's (dtrain/train/early_stop.py).

    def global_batch_for(self, world: int) -> int:
        """Global batch fixed by default (no LR change when the world changes); --batch-per-rank opts into
        a per-rank batch with the linear scaling rule, so the global batch and the LR follow the world."""
        batch_per_rank = self.cfg.train.batch_per_rank
        return batch_per_rank * world if batch_per_rank else self.cfg.train.global_batch_size

    def plan(self, at: Position, global_batch: int) -> EpochPlan:
        """The rest of ``at``'s epoch (--follow: of its segment, the files read at one poll) in batches of
        ``global_batch`` (the whole epoch from its start)."""
        cfg = self.cfg
        sizes = self.feed.train_sizes(at.epoch) if self.feed is not None else self.stats.train_sizes
        return EpochPlan.at(at, tuple(sizes), global_batch, self.seed,
                            shuffle=cfg.data.shuffle and not self.online, shuffle_window=cfg.data.shuffle_window,
                            drop_last=cfg.data.drop_last and not self.follow)

    # -- what a checkpoint and a commit hold ------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything a checkpoint holds (an elastic commit holds its model, optimizer and ``state``)."""
        state, feed = self.state, self.feed
        return {"model": self.model.state_dict(), "optimizer": self.step.optimizer.state_dict(),
                "position": {"epoch": state.epoch, "step": state.step, "row": state.row},
                "global_step": state.global_step, "samples": state.samples, "schedule": list(state.schedule),
                "early_stop": state.early, "best_model": state.best_model,
                "stats": self.stats.to_dict(), "config": self.cfg.to_dict(),
                "world_size": dist.size(), "follow": feed.to_dict() if feed is not None else None,
                "versions": {"dtrain": dtrain.__version__, "torch": torch.__version__}}

    def load_state_dict(self, resumed: dict[str, Any]) -> None:
        """Continue from a checkpoint (the same on every rank); it becomes the first elastic commit."""
        state = self.state
        try:
            # Sharded, every rank writes the same bytes into the one shared copy: loading on rank 0
            # alone would let another rank's first forward pass read it half loaded.
            self.model.load_state_dict(resumed["model"])
            self.step.optimizer.load_state_dict(resumed["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise UserError(f"--resume: the checkpoint's model does not fit this model and data "
                            f"({str(e).splitlines()[0]}); use the same --model flags, or --resume never") from None
        pos = checkpoint_position(resumed)
        if pos.epoch < (len(self.feed.segments) if self.feed is not None else self.epochs):
            epoch_rows = self.plan(Position(pos.epoch), 1).num_rows
            if pos.row > epoch_rows or self.plan(pos, self.global_batch_for(dist.size())).num_steps <= pos.step:
                pos = Position(pos.epoch + 1)  # the epoch is over (or forced onto smaller data)
        state.epoch, state.step, state.row = pos.epoch, pos.step, pos.row
        state.global_step, state.samples = resumed["global_step"], resumed["samples"]
        state.schedule = tuple(resumed.get("schedule", state.schedule))
        state.early, state.best_model = resumed.get("early_stop"), resumed.get("best_model")
        state.save()  # the checkpoint is the first commit (save: a commit's host check is a collective)

    def checkpoint(self, sync: bool = False) -> None:
        t0 = time.perf_counter()
        state = self.state
        meta = {"epoch": state.epoch, "position_step": state.step, "position_row": state.row,
                "world_size": self.world}
        self.coord.save(state.global_step, self.state_dict, meta, sync=sync, defer=self._only_stepped())
        self.meter.checkpoint += time.perf_counter() - t0

    def _only_stepped(self) -> Callable[[torch.Tensor], bool]:
        """Tensors that only ``optimizer.step()`` changes (parameters, optimizer state): an async
        checkpoint copies them while the next forward and backward run, fenced before the step.
        Buffers (e.g. batch-norm statistics) change in the forward pass: copied at once."""
        # By storage: sharded, the state dict's tensors are views of the shared ones.
        ptrs = {p.untyped_storage().data_ptr() for p in self.step.params} | {
            v.untyped_storage().data_ptr() for st in self.step.optimizer.state.values() for v in st.values()
            if isinstance(v, torch.Tensor)}
        return lambda t: t.numel() > 0 and t.untyped_storage().data_ptr() in ptrs

    # -- the run ------------------------------------------------------------------------------------------

    def fit(self) -> dict[str, Any]:
        """Train to the end (or a signal: SystemExit with 128 + the signal, after a checkpoint); the summary."""
        with connect(self.cfg.cluster) as client:
            self.client = client
            try:
                outcome = self._fit()
            finally:
                if self.client is not client:  # a client made when the scheduler came back (_scheduler_back)
                    self.client.close()
        return self.finish(outcome)

    def _fit(self) -> dict[str, Any]:
        """Data, model, the checkpoint to resume from, then training (elastic or not); the outcome."""
        resumed = self._setup_data()
        self._setup_model()
        # Room for two checkpoints of this model, before training (dtrain/storage.py).
        dist.run_on_main(lambda: self.coord.check_room(self.run_dir.path, self.model.state_dict().values()),
                         name="room")
        if resumed is not None:
            self.load_state_dict(resumed)
        outcome = dist.run_elastic(self._train_and_save_on_reset, self.state)
        self.coord.restore_signal_handlers()
        self.coord.close()
        return outcome

    def _train_and_save_on_reset(self, state: Any) -> dict[str, Any]:
        """``_train``, but a world change first puts the last commit on disk (by the rank that was 0): if
        the new world never forms (``--min-np`` not met), horovodrun ends the job, and the rerun resumes
        from here instead of from the last periodic checkpoint."""
        failure, _ = dist.elastic_resets() or (None, None)
        entry_rank = dist.rank()
        try:
            return self._train(state)
        except dist.elastic_resets() as e:
            self.coord.fence()  # Horovod's restore and sync overwrite the parameters next
            if entry_rank == 0:
                if failure is not None and isinstance(e, failure):
                    state.restore()  # mid-step: back to the commit (Horovod restores again, harmlessly)
                meta = {"epoch": state.epoch, "position_step": state.step, "position_row": state.row,
                        "reason": "world change"}
                self.coord.save(state.global_step, self.state_dict, meta, sync=True, force=True)
            raise

    def _train(self, state: Any) -> dict[str, Any]:
        """The loop, from wherever ``state`` stands, on the world as it is now."""
        self._start(state)
        stop, idle = self._fit_epochs(state)
        if self.meter.rows:
            self.last_loss = self.meter.loss / self.meter.rows
        if stop and not self.coord.signal:  # no signal: a rank lost the Dask scheduler (Stream.lost)
            self.checkpoint(sync=True)
            self.coord.close()
            raise ClusterLost(self.cfg.cluster.scheduler or "the embedded cluster", state.global_step,
                              self.coord.retry)
        if stop:  # stopped by a signal: save where we are and leave, resumable with the same command
            status = self.coord.save_and_stop(lambda: self.checkpoint(sync=True))
            log.warning("stopped at step %d; checkpoint saved in %s", state.global_step, self.coord.location)
            self.run_dir.close()
            raise SystemExit(status)
        return self._result(state, idle)

    def _start(self, state: Any) -> None:
        """What depends on the world: batch size, steps, LR schedule, streams, meters, the step policy."""
        cfg = self.cfg
        self.rank, self.world = rank, world = dist.rank(), dist.size()
        dist.configure_threads()  # the ranks on this host may have changed
        try:
            validate_world(self.stats.train_rows, world)
        except ValueError as e:
            raise UserError(f"--data: {e}") from None
        self.step.combine.check(self.device)
        self.global_batch = global_batch = self.global_batch_for(world)
        self.lr_scale = world if cfg.train.batch_per_rank else 1
        steps_per_epoch = self.plan(Position(), global_batch).num_steps
        self.total_steps, state.schedule = fit_schedule(cfg, self.plan, self.epochs, global_batch, state.global_step,
                                                        Position(state.epoch, state.step, state.row), state.samples,
                                                        state.schedule)
        self.schedule_start = state.schedule[:2]
        if not self.elastic:  # elastic runs: state.sync() did this
            dist.broadcast_parameters(self.model, buffers_only=self.step.sharded is not None)
        self.train_stream = self.stream(self.train_parts)
        log.info("rank %d/%d: %d train rows in %d partitions, global batch %d, %d steps/epoch, %d epochs, "
                 "from step %d, run dir %s", rank, world, self.stats.train_rows, len(self.stats.train_sizes),
                 global_batch, steps_per_epoch, self.epochs, state.global_step, self.run_dir.path)
        self.meter, self.total = Meter(), Meter()  # since the last metrics line; since this (re)start
        self.progress = Progress(dist.is_main(), cfg.run.progress_seconds)
        self.last_loss = float("nan")
        self.final_eval: dict[str, float] | None = None  # the last evaluation, while still current
        self.early_stopped = False  # --early-stop: the monitored metric stopped improving
        self.diverged = False  # --stop-diverged: the training loss diverged (same on every rank: synced losses)
        self.divergence = Divergence(cfg.train.stop_diverged) if cfg.train.stop_diverged else None
        self.step.counts.zero()  # a reset may have left a rolled-back step's sums
        self.step.combine.syncs = 0
        self.policy = StepPolicy(self.total_steps, cfg.train.sync_every, cfg.train.log_every,
                                 cfg.train.commit_every, self.elastic, self.follow)

    def stream(self, parts: list[Any]) -> Stream:
        return Stream(self.client, parts, len(self.stats.features), self.rank, self.world, self.cfg.data.prefetch,
                      self.device)

    def _fit_epochs(self, state: Any) -> tuple[bool, bool]:
        """Epochs until done; returns (stopped by a signal, --follow stopped by --idle-timeout).

        --follow: each "epoch" is a segment (the files one poll found), and the loop waits for the next
        one at the end of the last; otherwise epochs as usual.
        """
        self.model.train()
        feed = self.feed
        for epoch in itertools.count(state.epoch) if self.follow else range(state.epoch, self.epochs):
            if state.global_step >= self.total_steps or (
                    self.max_samples is not None and state.samples >= self.max_samples):
                break
            if self.monitor(state).should_stop:  # --early-stop ended this run (before a resume): it stays ended
                self.early_stopped = True
                break
            if feed is not None and epoch >= len(feed.segments):
                waited = self._file_waiter().wait(feed)
                if waited is not None:
                    return waited == "signal", waited == "idle"
                if not self.meter.rows:  # rates count from here, not from before the wait
                    self.meter = Meter()
            if self._fit_epoch(state, epoch):
                return True, False
            if self.early_stopped or self.diverged:
                break
        return False, False

    def _fit_epoch(self, state: Any, epoch: int) -> bool:
        """The rest of one epoch, then its evaluation; returns whether a signal stopped it."""
        policy, feed = self.policy, self.feed
        at = Position(epoch, state.step, state.row) if epoch == state.epoch else Position(epoch)
        left = None if self.max_samples is None else self.max_samples - state.samples
        epoch_plan = limited(self.plan(at, self.global_batch), left)
        if feed is not None and epoch > 0:
            self.train_stream = self.stream(self.dataset.file_partitions(feed.segments[epoch], "train"))
        self.progress.start_epoch(epoch, epoch_plan.num_steps, at.step)
        # The next epoch's first partitions are prepared while this one ends (not --follow: its next
        # segment is other files, maybe not there yet).
        then = self.plan(Position(epoch + 1), self.global_batch) if feed is None and epoch + 1 < self.epochs else None
        stop = False
        batches = self.train_stream.batches(epoch_plan, y_dtype=self.y_dtype, then=then)
        for batch in timed(batches, lambda: self.meter):
            stop, synced = self._train_step(state, epoch, epoch_plan, batch)
            stop = stop and not self._scheduler_back(state)
            if self.diverged or policy.stop(state.global_step, stop):
                break
            if policy.commit(state.global_step, synced):
                state.commit()  # (4) elastic: a commit to memory, also where changed hosts are noticed
            if policy.may_checkpoint(synced) and self.coord.due(state.global_step):
                self.checkpoint()
        else:  # the plan ran out: the next epoch starts at its first row, unless --max-samples cut this one
            # short (training then stands at the cut row, where a larger limit goes on)
            if not epoch_plan.cut:
                state.epoch, state.step, state.row = epoch + 1, 0, 0
        self.progress.close()
        if stop:
            return True
        if not self.online:
            self.final_eval = evaluate(self.model, self.stream(self.val_parts), self.val_sizes, self.cfg,
                                       self.stats)
            if self.final_eval:
                self.run_dir.metrics({"step": state.global_step, "epoch": epoch, "world_size": self.world,
                                      **self.final_eval})
                log.info("epoch %d: %s", epoch, " ".join(f"{k}={v:.4g}" for k, v in self.final_eval.items()))
                # Watched at each epoch's end only (not at a cut by --max-steps, which a resume would not repeat).
                if self.cfg.train.early_stop is not None and state.epoch > epoch:
                    self._watch(state, self.final_eval)
        return False

    def monitor(self, state: Any) -> Monitor:
        return Monitor.resume(self.cfg.train.monitor, self.cfg.train.early_stop, state.early)

    def _watch(self, state: Any, evaluation: dict[str, float]) -> None:
        """--early-stop: the monitor sees an epoch's evaluation; the best model is kept (a new copy)."""
        monitor = self.monitor(state).update(evaluation, state.global_step)
        state.early = monitor.to_dict()
        if monitor.improved:
            state.best_model = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        if monitor.should_stop:
            self.early_stopped = True
            log.info("early stop: %s has not improved for %d evaluations (best %.4g at step %d)",
                     monitor.metric, monitor.waited, monitor.best, monitor.best_step)

    def _train_step(self, state: Any, epoch: int, epoch_plan: EpochPlan, batch: Batch) -> tuple[bool, bool]:
        """One optimizer step on ``batch``; returns (some rank voted to stop, the step synced)."""
        cfg, policy, meter = self.cfg, self.policy, self.meter
        self.step.set_lr(cfg.optim.lr * self.lr_scale * lr_factor(cfg, state.global_step, self.total_steps,
                                                                    self.schedule_start,
                                                                    state.samples / self.stats.train_rows))
        last_of_epoch = batch.step + 1 == epoch_plan.num_steps
        sync = policy.sync(state.global_step, last_of_epoch, epoch_plan.cut)
        seconds, waited = self.step(batch, step_seed(self.seed, state.global_step, self.rank), sync,
                                    self._stop_vote, self.world, self.coord.fence)
        meter.allreduce += seconds
        meter.checkpoint += waited
        state.global_step += 1
        state.samples += batch.global_rows
        after = epoch_plan.position_after(batch.step)
        state.epoch, state.step, state.row = after.epoch, after.step, after.row
        self.final_eval = None
        if self.run_dir.audit:
            self.run_dir.audit_rows(self.rank, epoch, batch.step, batch.row_id)
        stop = False
        if sync:
            loss_sum, right, rows, votes = self.step.counts.take()
            meter.add(loss_sum, right, int(rows))
            self.total.add(loss_sum, right, int(rows))
            stop = votes > 0
            if self.divergence is not None and rows and self.divergence.update(loss_sum / rows):
                self.diverged = True
                log.info("the training loss diverged at step %d (smoothed above %g times its lowest, %.4g): "
                         "stopping", state.global_step, self.divergence.factor, self.divergence.lowest)
        if policy.log(state.global_step, last_of_epoch, meter.rows):
            self._log(state, epoch, batch)
        return stop, sync

    def _stop_vote(self) -> float:
        # A signal on any rank, or its lost Dask scheduler, stops every rank after this step (unless the
        # scheduler comes back: _scheduler_back).
        return self.coord.stop_flag or float(self.train_stream.lost)

    def _scheduler_back(self, state: Any) -> bool:
        """After a vote to stop: whether every rank carries on, the Dask scheduler some rank lost being back.

        Every rank saw the vote, so every rank is here. A signal anywhere stops them all, as before. A
        lost --scheduler is waited for, up to --scheduler-wait, in rounds that each end in an allreduce
        (``policy.scheduler_wait``), so that all ranks train the next step or all stop after this one
        with a checkpoint (``_train``); short rounds also keep a rank that is ready from stalling in a
        collective while another still waits. Every rank's futures went with the scheduler, so every
        rank submits its requests in flight again, whether or not it noticed the loss itself.
        """
        signals, lost = dist.allreduce_sum([self.coord.stop_flag, float(self.train_stream.lost)], name="stop-why")
        address, wait = self.cfg.cluster.scheduler, self.cfg.cluster.scheduler_wait
        # An embedded cluster's scheduler ran in rank 0's process: it does not come back.
        if signals or not lost or address is None or wait <= 0:
            return False
        self.train_stream.lose()  # on every rank: quiet Dask's own retries
        if dist.is_main():
            log.warning("lost the Dask scheduler at %s; waiting up to %gs for it to come back", address, wait)
        deadline = time.monotonic() + wait
        turn = "wait"
        while turn == "wait":
            self.client, ready = reconnect(self.client, address, min(deadline, time.monotonic() + WAIT_ROUND))
            turn = scheduler_wait(self.world, *dist.allreduce_sum(
                [float(ready), float(time.monotonic() >= deadline), self.coord.stop_flag], name="scheduler-wait"))
        if turn == "stop":
            return False
        resubmitted = dist.allreduce_sum([self.train_stream.resume(self.client)], name="resubmitted")[0]
        if dist.is_main():
            log.warning("the Dask scheduler is back; resubmitted %d requests, carrying on from step %d",
                        resubmitted, state.global_step)
        return True

    def _log(self, state: Any, epoch: int, batch: Batch) -> None:
        """A metrics line (and the progress bar) from the sums since the last one."""
        meter = self.meter
        self.last_loss = meter.loss / meter.rows
        record = {"step": state.global_step, "time": time.time(), "epoch": epoch, "samples": state.samples,
                  "loss": self.last_loss, "lr": self.step.optimizer.param_groups[0]["lr"], "world_size": self.world,
                  "global_batch": self.global_batch, "syncs": self.step.combine.syncs,
                  **meter.timing(time.perf_counter())}
        if self.stats.task == "classification":  # online: each row predicted before trained on
            record["progressive_accuracy" if self.online else "accuracy"] = meter.correct / meter.rows
        if self.feed is not None:
            record["files"] = self.feed.files_done(state.epoch, state.row)
        self.run_dir.metrics(record)
        self.progress.update(batch.step + 1, self.last_loss, record["samples_per_sec"])
        self.meter = Meter()

    def _file_waiter(self) -> FileWaiter:
        cfg = self.cfg
        assert cfg.data.data is not None
        return FileWaiter(cfg.data.data, cfg.data.poll_interval, cfg.data.idle_timeout, list_parquet,
                          self.dataset.new_files, lambda: self.coord.signal is not None, self._stop_vote,
                          lambda: self.checkpoint(sync=True))

    def _result(self, state: Any, idle: bool) -> dict[str, Any]:
        """The end of training: a final evaluation if the last one is stale, the final checkpoint, the hash."""
        return ending.outcome(self, state, idle)

    def finish(self, outcome: dict[str, Any]) -> dict[str, Any]:
        """The run directory's model and summary; returns the summary."""
        return ending.finish(self, outcome)
