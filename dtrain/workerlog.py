"""What Dask workers log about dtrain's tasks: nothing for the data errors a rank reports itself.

A :class:`~dtrain.data.DataError` raised in a task (a file without a column, a text value among numbers)
travels back to the rank, which prints it as one line naming the flag and the fix. The worker also logs
the failure ("Compute Failed", the task, the traceback: seven lines in the user's terminal for an
embedded cluster); :class:`QuietDataErrors`, registered on every worker, drops that record. Other
failures are logged as before: they are not ours to explain.
"""

from __future__ import annotations

import logging
from typing import Any

from distributed.diagnostics.plugin import WorkerPlugin

_LOGGER = "distributed.worker"


class _DropDataErrors(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith("Compute Failed") or not isinstance(record.args, tuple):
            return True
        # Args: key, state, task, the exception's repr (as text), the traceback.
        exception = str(record.args[3]) if len(record.args) > 3 else ""
        return not exception.lstrip("'\"").startswith("DataError(")


class QuietDataErrors(WorkerPlugin):
    """Installs the filter in a worker process (and in workers that join later: plugins are kept)."""

    name = "dtrain-quiet-data-errors"
    idempotent = True

    def setup(self, worker: Any) -> None:
        logger = logging.getLogger(_LOGGER)
        if not any(isinstance(f, _DropDataErrors) for f in logger.filters):
            logger.addFilter(_DropDataErrors())


def install(client: Any) -> None:
    """Register the filter on the cluster of ``client`` (once per name: registering again is a no-op)."""
    client.register_plugin(QuietDataErrors())
