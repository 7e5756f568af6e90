"""dtrain.dist's gradient collectives on 2 real ranks (horovodrun -np 2 --gloo), on both transports."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(240)]


@pytest.mark.parametrize("transport", ["auto", "horovod"])
def test_gradient_collectives_sum_exactly(horovodrun, transport):
    res = horovodrun([], script="tests/fixtures/collectives_check.py", env={"DTRAIN_ALLREDUCE": transport},
                     timeout=200).check()
    expected = "torch" if transport == "auto" else "horovod"  # one host, no GPU: auto picks torch's Gloo
    assert f"OK {expected}" in res.ranks[0], res.output[-3000:]
