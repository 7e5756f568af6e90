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

import datetime
import itertools
import json
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

import dtrain
from dtrain import dist, models
from dtrain.checkpoint import model_sha256
from dtrain.cluster import connect
from dtrain.config import Config, UserError
from dtrain.coordinator import Coordinator
from dtrain.data import Dataset, Stats, data_format, follow_root, list_parquet, open_dataset, parquet_source
from dtrain.data.follow import Feed, FileEntry, FileInfo, arrival_order, new_files
from dtrain.data.plan import EpochPlan, Position, limited, steps_for_samples, validate_world
from dtrain.data.stream import Batch, Stream
from dtrain.progress import Progress
from dtrain.rundir import RunDir
from dtrain.train.evaluate import evaluate
from dtrain.train.meter import Meter, timed
from dtrain.train.schedule import checkpoint_position, lr_factor, refit_schedule
from dtrain.train.step import forward_backward, gradient_buffers, make_optimizer, seed_step, shard_optimizer, step_seed

log = logging.getLogger(__name__)


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
        state = dist.training_state(model, optimizer, epoch=0, step=0, row=0, global_step=0, samples=0,
                                    schedule=(0, 0.0, 0, 0))
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
                                                                       schedule_start)
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
            if max_samples is not None and state.samples >= max_samples:
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
    }
    run_dir.save_model(model.state_dict())
    run_dir.write_json("summary.json", summary)
    run_dir.close()
    if dist.is_main():
        log.info("done: %s", json.dumps({k: v for k, v in summary.items() if k != "model_sha256"}))
    return summary
