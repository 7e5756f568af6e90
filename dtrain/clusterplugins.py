"""Plugins dtrain registers on the Dask cluster it uses: quiet workers, and tasks that survive a lost worker.

**Quiet about data errors.** A :class:`~dtrain.data.DataError` raised in a task (a file without a
column, a text value among numbers) travels back to the rank, which prints it as one line naming the
flag and the fix. The worker also logs
the failure ("Compute Failed", the task, the traceback: seven lines in the user's terminal for an
embedded cluster); :class:`QuietDataErrors`, registered on every worker, drops that record. Other
failures are logged as before: they are not ours to explain. It also drops the worker's warning that a
task it was running "ended with CancelledError": that is a rank releasing work it no longer needs, or
the embedded cluster closing under a task as a run ends on an error the rank has already reported.

**Tasks re-homed after a lost worker.** The stream sends each partition's tasks to a home worker, as a
loose restriction (``allow_other_workers``). When that worker dies while the cluster has no other, its
tasks wait as ``no-worker``, and Dask gives the worker that joins next (the restarted one) only tasks
whose restrictions name it or have none: loose ones naming a dead worker waited for ever (measured:
one SIGKILLed worker of an embedded cluster stalled the rank for good, the restarted worker idle).
:class:`RehomeLostTasks` lifts such restrictions as a worker joins, so it takes them at once.
"""

from __future__ import annotations

import logging
from typing import Any

from distributed.diagnostics.plugin import SchedulerPlugin, WorkerPlugin

log = logging.getLogger(__name__)
_LOGGER = "distributed.worker"
_STATE_LOGGER = "distributed.worker.state_machine"


class _DropDataErrors(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith("Compute Failed") or not isinstance(record.args, tuple):
            return True
        # Args: key, state, task, the exception's repr (as text), the traceback.
        exception = str(record.args[3]) if len(record.args) > 3 else ""
        return not exception.lstrip("'\"").startswith("DataError(")


class _DropCancelled(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not (text.startswith("Async instruction for") and text.endswith("ended with CancelledError"))


class QuietDataErrors(WorkerPlugin):
    """Installs the filters in a worker process (and in workers that join later: plugins are kept)."""

    name = "dtrain-quiet-data-errors"
    idempotent = True

    def setup(self, worker: Any) -> None:
        for name, kind in ((_LOGGER, _DropDataErrors), (_STATE_LOGGER, _DropCancelled)):
            logger = logging.getLogger(name)
            if not any(isinstance(f, kind) for f in logger.filters):
                logger.addFilter(kind())


class RehomeLostTasks(SchedulerPlugin):
    """On the scheduler: a joining worker may run waiting tasks whose loose restrictions name only gone workers."""

    name = "dtrain-rehome-lost-tasks"
    idempotent = True

    def add_worker(self, scheduler: Any, worker: str) -> None:
        # Called before the scheduler hands the new worker the no-worker tasks it may run.
        for ts in scheduler.unrunnable:
            if ts.loose_restrictions and ts.worker_restrictions and \
                    not any(w in scheduler.workers for w in ts.worker_restrictions):
                ts.worker_restrictions = None
                ts.loose_restrictions = False


def install(client: Any) -> None:
    """Register the plugins on the cluster of ``client`` (once per name: registering again is a no-op)."""
    for plugin in (QuietDataErrors(), RehomeLostTasks()):
        try:
            client.register_plugin(plugin)
        except Exception as e:  # e.g. a scheduler without dtrain installed cannot unpickle it
            log.warning("could not register %s on the Dask cluster (%s); training goes on without it",
                        plugin.name, str(e).splitlines()[0] if str(e) else type(e).__name__)
