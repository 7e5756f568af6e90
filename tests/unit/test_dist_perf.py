"""dtrain.dist's performance choices that need no second rank: flat buffers and the transport choice."""

from __future__ import annotations

import pytest
import torch

from dtrain import dist, shm, transport
from dtrain.config import UserError
from dtrain.flat import tiled_base

pytestmark = pytest.mark.unit


def test_flat_views_tile_one_zeroed_buffer_in_order():
    like = [torch.empty(2, 3), torch.empty(4), torch.empty(1, 1)]
    views, tail = dist.flat_views(like, extra=4)
    assert [v.shape for v in views] == [t.shape for t in like] and tail.numel() == 4
    assert all(not v.any() for v in [*views, tail])
    base = tiled_base([*views, tail])
    assert base is not None and base.numel() == 6 + 4 + 1 + 4
    views[1].fill_(7.0)
    assert base[6:10].eq(7.0).all()  # views, not copies


def test_tiled_base_refuses_anything_but_an_exact_in_order_tiling():
    views, tail = dist.flat_views([torch.empty(3), torch.empty(2)], extra=1)
    assert tiled_base([*views, tail]) is not None
    assert tiled_base([views[1], views[0], tail]) is None  # out of order
    assert tiled_base(views) is None  # the tail is left out: the buffer is not covered
    assert tiled_base([torch.zeros(3), torch.zeros(2)]) is None  # separate tensors
    assert tiled_base([torch.zeros(2, 3)]) is None  # not 1-D
    flat = torch.zeros(5)
    assert tiled_base([flat]) is flat  # one flat tensor is its own buffer
    assert tiled_base([flat[:2], flat[3:]]) is None  # a gap


ONE_HOST = {"HOROVOD_RANK": "0", "HOROVOD_CROSS_SIZE": "1"}
TWO_HOSTS = {"HOROVOD_RANK": "0", "HOROVOD_SIZE": "4", "HOROVOD_LOCAL_SIZE": "2", "HOROVOD_CROSS_SIZE": "2"}


@pytest.mark.parametrize(("env", "shm_supported", "expected"), [
    ({}, True, "horovod"),  # not under horovodrun
    (ONE_HOST, True, "shm"),
    (ONE_HOST, False, "torch"),  # not x86-64 Linux: Gloo
    (TWO_HOSTS, True, "hier"),  # several hosts: shared memory within each, Gloo across by shards
    (TWO_HOSTS, False, "torch"),
    ({**TWO_HOSTS, "DTRAIN_ALLREDUCE": "torch"}, True, "torch"),
    ({**TWO_HOSTS, "DTRAIN_ALLREDUCE": "hier"}, True, "hier"),
    ({**ONE_HOST, "DTRAIN_ALLREDUCE": "hier"}, True, "shm"),  # one host: the hierarchy is its shared memory
    ({**TWO_HOSTS, "HOROVOD_ELASTIC": "1"}, True, "horovod"),
    ({**TWO_HOSTS, "HOROVOD_TIMELINE": "/tmp/t.json"}, True, "horovod"),
    # Hosts of 2, 1 and 1 ranks: local rank 1 of the first host has a cross size of 1, and still spans hosts.
    ({"HOROVOD_RANK": "1", "HOROVOD_SIZE": "4", "HOROVOD_LOCAL_SIZE": "2", "HOROVOD_CROSS_SIZE": "1"}, True, "hier"),
    ({**ONE_HOST, "DTRAIN_ALLREDUCE": "torch"}, True, "torch"),
    ({**ONE_HOST, "DTRAIN_ALLREDUCE": "shm"}, True, "shm"),
    ({**ONE_HOST, "DTRAIN_ALLREDUCE": "horovod"}, True, "horovod"),
    ({**ONE_HOST, "HOROVOD_AUTOTUNE": "1"}, True, "horovod"),
    ({**ONE_HOST, "HOROVOD_AUTOTUNE": "0"}, True, "shm"),
    ({**ONE_HOST, "HOROVOD_TIMELINE": "/tmp/t.json"}, True, "horovod"),
    ({**ONE_HOST, "HOROVOD_ELASTIC": "1"}, True, "horovod"),
])
def test_gradient_transport_choice(monkeypatch, env, shm_supported, expected):
    _transport_env(monkeypatch, env, shm_supported)
    assert dist.gradient_transport() == expected


@pytest.mark.parametrize(("env", "shm_supported", "expected"), [
    ({**TWO_HOSTS, "DTRAIN_ALLREDUCE": "shm"}, True, "DTRAIN_ALLREDUCE=shm needs every rank on one x86-64 Linux host"),
    ({**ONE_HOST, "DTRAIN_ALLREDUCE": "shm"}, False, "DTRAIN_ALLREDUCE=shm needs every rank on one x86-64 Linux host"),
    ({**TWO_HOSTS, "DTRAIN_ALLREDUCE": "hier"}, False, "DTRAIN_ALLREDUCE=hier needs x86-64 Linux hosts"),
])
def test_shared_memory_asked_for_where_it_cannot_serve(monkeypatch, env, shm_supported, expected):
    _transport_env(monkeypatch, env, shm_supported)
    with pytest.raises(UserError, match=expected):
        dist.gradient_transport()


@pytest.mark.parametrize(("env", "cuda", "shm_supported", "expected"), [
    (ONE_HOST, False, True, None),  # shared memory
    (TWO_HOSTS, False, True, None),  # hierarchical
    ({}, False, True, None),  # one process
    (TWO_HOSTS, False, False, "shared memory is not supported"),
    ({**TWO_HOSTS, "HOROVOD_ELASTIC": "1"}, False, True, "an elastic run"),
    ({"HOROVOD_ELASTIC": "1"}, False, True, "an elastic run"),  # elastic: no host counts in the environment
    (TWO_HOSTS, True, True, "GPUs"),
    ({**TWO_HOSTS, "DTRAIN_ALLREDUCE": "torch"}, False, True, "DTRAIN_ALLREDUCE=torch"),
    ({**ONE_HOST, "HOROVOD_TIMELINE": "/tmp/t.json"}, False, True, "Horovod's autotuner or timeline"),
])
def test_why_the_ranks_do_not_sum_through_shared_memory(env, cuda, shm_supported, expected):
    why = transport.fallback(env, cuda, transport.choose(env, cuda, shm_supported))
    assert (why is None) if expected is None else (why is not None and why.startswith(expected)), why


def _transport_env(monkeypatch, env, shm_supported):
    for k in ("HOROVOD_RANK", "HOROVOD_SIZE", "HOROVOD_LOCAL_SIZE", "HOROVOD_CROSS_SIZE", "DTRAIN_ALLREDUCE",
              "HOROVOD_AUTOTUNE", "HOROVOD_TIMELINE", "HOROVOD_ELASTIC"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(shm, "supported", lambda: shm_supported)


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
    assert dist.peer_failure(RuntimeError(f"rank 1 (pid 4242) stopped: {shm.PEER_GONE}"))
