"""The coordinator: the one place that decides when to checkpoint, when to stop, and what to resume.

Its step-by-step decisions (does this step sync, log, commit, may it checkpoint, does the loop stop,
and why a run ended) are the pure ``StepPolicy`` of ``dtrain/policy.py``, which the trainer asks at
every step; this module keeps the parts with state and I/O: the clock of ``--checkpoint-seconds``,
the checkpointer, the signals.

* **Resume**: rank 0 finds the checkpoint (``--resume auto|never|PATH``), verifies it and hands it to
  every rank; resuming against different data or preprocessing is refused unless ``--force-resume``.
* **Checkpoint**: every ``--checkpoint-every`` steps and/or ``--checkpoint-seconds``, at the end, and
  when stopped by SIGTERM/SIGINT. Rank 0 alone writes, so the decision needs no collective.
* **Stop**: a signal only raises a local flag; the flag travels in the step's allreduce, so every rank
  stops after the *same* step even when the signals arrive at different moments (horovodrun forwards
  SIGTERM to each rank and kills them 5 s later).

Exit status after a signal: 128 + the signal number (143 for SIGTERM, 130 for SIGINT), after the
final checkpoint is written; the job is resumable with the same command.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable, Iterable
from types import FrameType
from typing import Any

import torch

from dtrain import dist
from dtrain.checkpoint import Checkpointer, CheckpointError, load
from dtrain.config import Config, UserError
from dtrain.storage import SaveRetry, check_room, checkpoint_bytes, probe, reason

log = logging.getLogger(__name__)


class Coordinator:
    @property
    def ckpt(self) -> Checkpointer | None:
        """Rank 0's checkpointer (rank 0 can change in elastic runs); None on the other ranks."""
        return self._ckpt if dist.is_main() else None

    def __init__(self, cfg: Config, checkpoint_dir: str):
        self.cfg = cfg
        self.location = checkpoint_dir
        self._ckpt = Checkpointer(checkpoint_dir, keep=cfg.run.keep)
        self.signal: int | None = None  # the signal received on this rank, if any
        self._last_save = time.monotonic()
        self._previous: dict[int, Any] = {}
        self.retry = SaveRetry()  # failed saves: warned once, tried again at growing intervals

    # -- resume ---------------------------------------------------------------------------------------

    def resume(self, fingerprint: str | None) -> dict[str, Any] | None:
        """The trainer state to continue from (the same on every rank), or None to start afresh.

        ``fingerprint`` None defers the data check to :meth:`check_fingerprint` (``--follow`` learns which
        files its data is from the checkpoint itself).
        """

        def find() -> dict[str, Any] | None:
            run = self.cfg.run
            if run.resume == "never" or self.ckpt is None:
                return None
            if run.resume == "auto":
                found = self.ckpt.latest()
                if found is None:
                    return None
                path, state = found
            else:
                path = run.resume
                try:
                    state = load(path)
                except CheckpointError as e:
                    raise UserError(f"--resume: {e}; pass a checkpoint directory, auto or never") from None
            state["_path"] = str(path)
            if fingerprint is not None:
                self.check_fingerprint(state, fingerprint)
            log.info("resuming from %s (step %d)", path, state["global_step"])
            return state

        return dist.run_on_main(find, name="resume")

    def check_fingerprint(self, state: dict[str, Any] | None, fingerprint: str) -> None:
        """Refuse to resume ``state`` on data or preprocessing other than its own, unless --force-resume."""
        if state is None:
            return
        theirs = state["stats"]["fingerprint"]
        if theirs != fingerprint and not self.cfg.run.force_resume:
            raise UserError(
                f"--resume: {state.get('_path', 'the checkpoint')} was trained on different data or preprocessing "
                f"(fingerprint {theirs[:12]} vs {fingerprint[:12]}); use the same data flags, "
                "--resume never, or --force-resume"
            )

    # -- checkpoints ----------------------------------------------------------------------------------

    def due(self, global_step: int) -> bool:
        """Whether rank 0 should checkpoint after ``global_step`` (other ranks never write)."""
        run = self.cfg.run
        if self.ckpt is None:
            return False
        due = (bool(run.checkpoint_every) and global_step % run.checkpoint_every == 0) or (
            bool(run.checkpoint_seconds) and time.monotonic() - self._last_save >= run.checkpoint_seconds)
        # At a due point, the last async save's outcome first (the save would wait for it anyway): the
        # retry schedule must not depend on whether a failing write had ended by now.
        self._collect(block=due)
        if due and not self.retry.attempt():  # saves keep failing: this due point is passed over
            self._last_save = time.monotonic()
            return False
        return due

    def save(self, global_step: int, state: Callable[[], dict[str, Any]], meta: dict[str, Any],
             sync: bool = False, force: bool = False, defer: Callable[[torch.Tensor], bool] | None = None) -> None:
        """Checkpoint on rank 0 (``force``: on this rank whatever its rank now, e.g. during a reset).

        ``defer`` selects tensors the caller leaves unchanged until ``fence()``; they are copied off
        the loop (see ``Checkpointer.save_async``).
        """
        ckpt = self._ckpt if force else self.ckpt
        if ckpt is None:
            return
        self._collect(ckpt, block=True)
        self._last_save = time.monotonic()
        if sync:
            try:
                ckpt.write(global_step, state(), meta)
            except Exception as e:  # no space, read-only, an I/O or object store error
                self._failed(global_step, e)
            else:
                self._succeeded(global_step)
        else:
            ckpt.save_async(global_step, state(), meta, defer=defer)

    def _collect(self, ckpt: Checkpointer | None = None, block: bool = False) -> None:
        """Learn how the last async save ended (``block``: wait for it)."""
        ended = (ckpt or self._ckpt).collect(block)
        if ended is not None:
            step, error = ended
            if error is None:
                self._succeeded(step)
            else:
                self._failed(step, error)

    def _failed(self, step: int, error: BaseException) -> None:
        """A save that failed loses nothing but itself: its partial files are gone (Checkpointer.write),
        the last good checkpoint stays, training goes on. One warning per streak of failures."""
        first = self.retry.failed(reason(error))
        kept = self.retry.last_good_step
        (log.warning if first else log.debug)(
            "checkpoint of step %d not written to %s (%s); %s; trying again at the next due checkpoint, "
            "then less often while it fails", step, self.location, reason(error),
            f"step {kept}'s stays the latest" if kept is not None else "the last good one stays")

    def _succeeded(self, step: int) -> None:
        if self.retry.succeeded(step):
            log.warning("checkpoint at step %d written to %s: checkpoints work again", step, self.location)

    def fence(self) -> float:
        """Before changing the tensors a save deferred: wait until the checkpoint has copied them.
        Returns the seconds waited (0.0 at once when nothing is deferred).

        Not only on rank 0: a process that wrote as rank 0 may have another rank after a world change.
        """
        return self._ckpt.fence()

    def close(self) -> None:
        self._collect(block=True)

    def sweep(self) -> None:
        """Remove what crashed runs left half-written in the checkpoint location (rank 0, at start)."""
        if self.ckpt is not None:
            for path in self.ckpt.sweep():
                log.warning("removed %s, a checkpoint an earlier run left half-written", path)

    # -- before training --------------------------------------------------------------------------------

    def preflight(self, run_dir: str) -> None:
        """Before anything is read: the run directory and the checkpoint location take a write (UserError
        naming the flag if not), and what crashed runs left half-written is swept. On rank 0 (it alone
        writes); run it through ``dist.run_on_main`` so that every rank stops on a failure."""
        probe(run_dir, "--run-dir")
        if self.location != os.path.join(run_dir, "checkpoints"):
            probe(self.location, "--checkpoint-dir")
        self.sweep()

    def check_room(self, run_dir: str, tensors: Iterable[torch.Tensor]) -> None:
        """Before training: room for two checkpoints of this model where they go (local paths), and for
        the final model.pt in the run directory (UserError naming the flag if not)."""
        model = sum(t.numel() * t.element_size() for t in tensors)
        o = self.cfg.optim
        two = 2 * checkpoint_bytes([model], o.optimizer, o.momentum)
        if self.cfg.run.checkpoint_dir is None:  # under the run directory: one file system for both
            check_room(run_dir, two + model, "--run-dir", "two checkpoints and the final model")
            return
        check_room(self.location, two, "--checkpoint-dir", "two checkpoints of this model")
        check_room(run_dir, model, "--run-dir", "the final model")

    def report(self) -> dict[str, Any]:
        """For summary.json: the checkpoint failures of this run, if any."""
        return self.retry.report()

    # -- stopping -------------------------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        def handler(signum: int, frame: FrameType | None) -> None:
            if self.signal is not None:  # a second signal: stop now, the hard way
                signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
                signal.raise_signal(signum)
                return
            self.signal = signum
            log.warning("%s received: stopping after this step with a checkpoint",
                        signal.Signals(signum).name)

        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, handler)

    def save_and_stop(self, save: Callable[[], None]) -> int:
        """After stopping on a signal: ``save``, wait for every write, then restore the handlers; returns
        the exit status (128 + the signal).

        The handlers stay installed while saving: a rank stopped by another's vote may get its own
        signal only now (horovodrun signals the ranks one after the other, and a step takes a
        millisecond), and the default action would kill rank 0 mid-save. The handler only notes a first
        signal; a second one still stops the process at once.
        """
        save()
        self.close()
        self.restore_signal_handlers()
        return 128 + (self.signal or signal.SIGTERM)

    def restore_signal_handlers(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    @property
    def stop_flag(self) -> float:
        """This rank's vote to stop, summed across ranks in the step's allreduce."""
        return 1.0 if self.signal is not None else 0.0
