"""dtrain.dist's gradient collectives on 2 real ranks (horovodrun -np 2 --gloo), on every transport."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(240)]


@pytest.mark.parametrize(("transport", "expected"), [
    ("auto", "shm"),  # one x86-64 host, no GPU: auto picks shared memory
    ("torch", "torch"),
    ("horovod", "horovod"),
])
def test_gradient_collectives_sum_exactly(horovodrun, transport, expected):
    res = horovodrun([], script="tests/fixtures/collectives_check.py", env={"DTRAIN_ALLREDUCE": transport},
                     timeout=200).check()
    assert f"OK {expected}" in res.ranks[0], res.output[-3000:]
