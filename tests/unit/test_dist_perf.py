"""dtrain.dist's performance choices that need no second rank: flat buffers and the transport choice."""

from __future__ import annotations

import pytest
import torch

from dtrain import dist
from dtrain.config import UserError

pytestmark = pytest.mark.unit


def test_flat_views_tile_one_zeroed_buffer_in_order():
    like = [torch.empty(2, 3), torch.empty(4), torch.empty(1, 1)]
    views, tail = dist.flat_views(like, extra=4)
    assert [v.shape for v in views] == [t.shape for t in like] and tail.numel() == 4
    assert all(not v.any() for v in [*views, tail])
    base = dist._tiled_base([*views, tail])
    assert base is not None and base.numel() == 6 + 4 + 1 + 4
    views[1].fill_(7.0)
    assert base[6:10].eq(7.0).all()  # views, not copies


def test_tiled_base_refuses_anything_but_an_exact_in_order_tiling():
    views, tail = dist.flat_views([torch.empty(3), torch.empty(2)], extra=1)
    assert dist._tiled_base([*views, tail]) is not None
    assert dist._tiled_base([views[1], views[0], tail]) is None  # out of order
    assert dist._tiled_base(views) is None  # the tail is left out: the buffer is not covered
    assert dist._tiled_base([torch.zeros(3), torch.zeros(2)]) is None  # separate tensors
    assert dist._tiled_base([torch.zeros(2, 3)]) is None  # not 1-D
    flat = torch.zeros(5)
    assert dist._tiled_base([flat]) is flat  # one flat tensor is its own buffer
    assert dist._tiled_base([flat[:2], flat[3:]]) is None  # a gap


@pytest.mark.parametrize(("env", "expected"), [
    ({}, "horovod"),  # not under horovodrun
    ({"HOROVOD_RANK": "0", "HOROVOD_CROSS_SIZE": "1"}, "torch"),
    ({"HOROVOD_RANK": "0", "HOROVOD_CROSS_SIZE": "2"}, "horovod"),  # several hosts: auto stays on Horovod
    ({"HOROVOD_RANK": "0", "HOROVOD_CROSS_SIZE": "2", "DTRAIN_ALLREDUCE": "torch"}, "torch"),
    ({"HOROVOD_RANK": "0", "HOROVOD_CROSS_SIZE": "1", "DTRAIN_ALLREDUCE": "horovod"}, "horovod"),
    ({"HOROVOD_RANK": "0", "HOROVOD_CROSS_SIZE": "1", "HOROVOD_AUTOTUNE": "1"}, "horovod"),
    ({"HOROVOD_RANK": "0", "HOROVOD_CROSS_SIZE": "1", "HOROVOD_AUTOTUNE": "0"}, "torch"),
    ({"HOROVOD_RANK": "0", "HOROVOD_CROSS_SIZE": "1", "HOROVOD_TIMELINE": "/tmp/t.json"}, "horovod"),
    ({"HOROVOD_RANK": "0", "HOROVOD_CROSS_SIZE": "1", "HOROVOD_ELASTIC": "1"}, "horovod"),
])
def test_gradient_transport_choice(monkeypatch, env, expected):
    for k in ("HOROVOD_RANK", "HOROVOD_CROSS_SIZE", "DTRAIN_ALLREDUCE", "HOROVOD_AUTOTUNE", "HOROVOD_TIMELINE",
              "HOROVOD_ELASTIC"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert dist.gradient_transport() == expected


def test_gradient_transport_rejects_unknown_values(monkeypatch):
    monkeypatch.setenv("DTRAIN_ALLREDUCE", "mpi")
    with pytest.raises(UserError, match="DTRAIN_ALLREDUCE"):
        dist.gradient_transport()


def test_one_process_collectives_leave_tensors_alone():
    t, c = torch.ones(3), torch.tensor([1.0, 2.0])
    dist.allreduce_sum_([t], compression="fp16", uncompressed=[c])
    dist.allreduce_average_([t])
    assert torch.equal(t, torch.ones(3)) and torch.equal(c, torch.tensor([1.0, 2.0]))


def test_peer_failure_recognises_a_gloo_peer_gone():
    gone = RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:11697. This is "
                        "typically caused by a remote worker crashing.")
    assert dist.peer_failure(gone)
    assert not dist.peer_failure(RuntimeError("shape mismatch"))
    assert not dist.peer_failure(ValueError("Connection closed by peer"))  # only as Gloo raises it
