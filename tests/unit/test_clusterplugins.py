"""The logging filters dtrain's worker plugin installs (dtrain/clusterplugins.py), on real log records."""

from __future__ import annotations

import logging

import pytest

from dtrain.clusterplugins import QuietDataErrors

pytestmark = [pytest.mark.unit, pytest.mark.timeout(30)]


def test_a_worker_drops_our_data_errors_and_cancelled_tasks_and_keeps_the_rest(caplog):
    QuietDataErrors().setup(None)
    QuietDataErrors().setup(None)  # a worker that joins again: the filters once
    worker, state = logging.getLogger("distributed.worker"), logging.getLogger("distributed.worker.state_machine")
    assert len(worker.filters) == len(state.filters) == 1
    with caplog.at_level(logging.WARNING):
        worker.error("Compute Failed\nKey: %s\nState: %s\nTask: %s\nException: %s\nTraceback: %s\n",
                     "k", "executing", "t", "'DataError(\"--data: bad\")'", "tb")
        worker.error("Compute Failed\nKey: %s\nState: %s\nTask: %s\nException: %s\nTraceback: %s\n",
                     "k", "executing", "t", "'ValueError(\"x\")'", "tb")
        state.warning("Async instruction for <Task cancelled name=\"execute(('x', 2))\"> ended with CancelledError")
        state.warning("Async instruction for <Task x> ended with OSError")
    assert [r.getMessage().splitlines()[-2] if r.name == "distributed.worker" else r.getMessage()
            for r in caplog.records] == ["Exception: 'ValueError(\"x\")'",
                                         "Async instruction for <Task x> ended with OSError"]
