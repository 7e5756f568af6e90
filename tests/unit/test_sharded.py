"""dtrain.sharded's optimizer step on real processes sharing memory, against one plain torch optimizer
stepping on the ranks' summed gradients."""

from __future__ import annotations

import copy
import os
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch

from dtrain import shm
from dtrain.config import Config, OptimConfig
from dtrain.models import mlp
from dtrain.sharded import ShardedOptimizer
from dtrain.train.step import make_optimizer

from shm_ranks import group as _group, run as _run  # isort: skip

pytestmark = [pytest.mark.unit, pytest.mark.timeout(180),
              pytest.mark.skipif(not shm.supported(), reason="shared memory needs x86-64 Linux")]

OPTIMIZERS = {
    "sgd": OptimConfig(optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=1e-3),
    "adam": OptimConfig(optimizer="adam", lr=0.01),
    "adamw": OptimConfig(optimizer="adamw", lr=0.01, weight_decay=0.1),
    "adagrad": OptimConfig(optimizer="adagrad", lr=0.1),
}


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return mlp(5, 3, [7, 6])  # 105 parameters: shards of 35 over 3 ranks cut through tensors


def _make(name: str, params: Any) -> torch.optim.Optimizer:
    return make_optimizer(Config(optim=OPTIMIZERS[name]), params)


def _attach(params: list[torch.nn.Parameter], buffer: torch.Tensor) -> None:
    """Make the parameters' gradients views that tile ``buffer`` in order, as dtrain's engine does."""
    offset = 0
    for p in params:
        p.grad = buffer[offset : offset + p.numel()].view_as(p)
        offset += p.numel()


def _rank_grads(model: torch.nn.Module, rank: int, step: int) -> None:
    """This rank's gradients of ``step``, added into ``.grad`` (a different batch per rank and step)."""
    g = torch.Generator().manual_seed(100 * step + rank)
    x, y = torch.randn(4, 5, generator=g), torch.randint(0, 3, (4,), generator=g)
    torch.nn.functional.cross_entropy(model(x), y, reduction="sum").backward()


def _sharded(rank: int, size: int, directory: str, out: Any, name: str, clip: float | None,
             steps: range, start: tuple[dict[str, Any], dict[str, Any]] | None) -> None:
    torch.set_num_threads(1)
    group = _group(Path(directory), rank, size)
    model = _model()
    if start is not None:
        model.load_state_dict(start[0])
    params = list(model.parameters())
    numel = sum(p.numel() for p in params)
    buffer = group.alloc(numel + 4)
    _attach(params, buffer)
    assert ShardedOptimizer.possible(params, buffer, size) is None
    opt = ShardedOptimizer(group, params, buffer, lambda ps: _make(name, ps), clip)
    if start is not None:
        opt.load_state_dict(start[1])
    tails = []
    for step in steps:
        opt.zero_grad()
        _rank_grads(model, rank, step)
        buffer[numel:] = torch.tensor([rank + 1.0, step, 0.5, 0.0])  # the counts after the gradients
        opt.step()
        tails.append(buffer[numel:].clone())
    result = ({k: v.clone() for k, v in model.state_dict().items()}, copy.deepcopy(opt.state_dict()))
    leftover = sorted(os.listdir(Path(directory) / "shm"))
    group.close()
    out.put(pickle.dumps((rank, result, tails, leftover)))


def _reference(name: str, clip: float | None, size: int, steps: range,
               start: tuple[dict[str, Any], dict[str, Any]] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """One process, one torch optimizer over the whole model, stepping on the ranks' summed gradients."""
    model = _model()
    opt = _make(name, model.parameters())
    if start is not None:
        model.load_state_dict(start[0])
        opt.load_state_dict(copy.deepcopy(start[1]))
    for step in steps:
        per_rank = []
        for rank in range(size):
            opt.zero_grad(set_to_none=True)
            _rank_grads(model, rank, step)
            per_rank.append([p.grad.clone() for p in model.parameters()])
        for p, *grads in zip(model.parameters(), *per_rank, strict=True):
            total = grads[0] + grads[1]  # in rank order, as the shards are summed
            for g in grads[2:]:
                total += g
            p.grad = total
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(list(model.parameters()), clip)
        opt.step()
    return {k: v.clone() for k, v in model.state_dict().items()}, copy.deepcopy(opt.state_dict())


def _assert_same(got: Any, expected: Any, exact: bool, where: str = "") -> None:
    if isinstance(expected, dict):
        assert list(got) == list(expected), where
        for k in expected:
            _assert_same(got[k], expected[k], exact, f"{where}/{k}")
    elif isinstance(expected, torch.Tensor):
        assert got.shape == expected.shape and got.dtype == expected.dtype, where
        if exact:
            assert torch.equal(got, expected), where
        else:
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6, msg=where)
    else:
        assert got == expected, where


# Torch's fused optimizers round a tensor's vectorised body and its tail differently: cut into other
# tensors, an element may differ in its last bits, and the difference grows over steps.
EXACT = {"sgd": False, "adagrad": True, "adam": False, "adamw": False}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_a_sharded_step_is_the_whole_optimizer_step(tmp_path, name):
    size, steps = 3, range(4)
    per_rank = _run(size, _sharded, tmp_path, name, None, steps, None)
    expected = _reference(name, None, size, steps)
    for rank, (model_state, opt_state), tails, leftover in per_rank:
        _assert_same(model_state, expected[0], EXACT[name], where=f"rank {rank} model")
        # The state dict of one optimizer over the whole model: the checkpoint format is unchanged.
        _assert_same(opt_state, expected[1], EXACT[name], where=f"rank {rank} optimizer")
        for step, tail in zip(steps, tails, strict=True):
            assert tail.tolist() == [1.0 + 2.0 + 3.0, 3.0 * step, 1.5, 0.0]  # summed in full on every rank
        assert leftover == []  # every file unlinked once mapped
    assert not list((tmp_path / "shm").iterdir())


def test_clipping_uses_the_norm_of_the_whole_gradient(tmp_path):
    size, steps = 2, range(3)
    per_rank = _run(size, _sharded, tmp_path, "sgd", 0.5, steps, None)
    expected = _reference("sgd", 0.5, size, steps)
    unclipped = _reference("sgd", None, size, steps)
    for _rank, (model_state, opt_state), _tails, _leftover in per_rank:
        _assert_same(model_state, expected[0], exact=False)
        _assert_same(opt_state, expected[1], exact=False)
    assert not torch.allclose(expected[0]["0.weight"], unclipped[0]["0.weight"])  # the limit was reached


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_any_world_size_resumes_the_other_s_optimizer_state(tmp_path, name):
    # A plain optimizer's state after 2 steps, loaded by 2 ranks that shard it, equals the plain
    # optimizer going on; and the state dict the ranks give back loads into a plain optimizer.
    halfway = _reference(name, None, 3, range(2))
    per_rank = _run(2, _sharded, tmp_path, name, None, range(2, 4), halfway)
    expected = _reference(name, None, 2, range(2, 4), start=halfway)
    for rank, (model_state, opt_state), _tails, _leftover in per_rank:
        _assert_same(model_state, expected[0], EXACT[name], where=f"rank {rank} model")
        _assert_same(opt_state, expected[1], EXACT[name], where=f"rank {rank} optimizer")
    model = _model()
    plain = _make(name, model.parameters())
    plain.load_state_dict(per_rank[0][1][1])
    _assert_same(plain.state_dict(), per_rank[0][1][1], exact=True)


def test_an_optimizer_state_of_another_model_is_refused(tmp_path):
    group = shm.ShmGroup(0, 1, "test", lambda obj: [obj], directory=str(tmp_path))
    model = _model()
    params = list(model.parameters())
    numel = sum(p.numel() for p in params)
    buffer = group.alloc(numel + 4)
    _attach(params, buffer)
    opt = ShardedOptimizer(group, params, buffer, lambda ps: _make("sgd", ps))
    other = mlp(5, 3, [8, 6])
    other_opt = _make("sgd", other.parameters())
    other(torch.randn(2, 5)).sum().backward()
    other_opt.step()
    with pytest.raises(ValueError, match="does not fit this model"):
        opt.load_state_dict(other_opt.state_dict())
    with pytest.raises(ValueError, match="parameters in 1 group"):
        opt.load_state_dict({"state": {}, "param_groups": [{"params": [0, 1]}]})
    group.close()


def test_what_cannot_be_sharded_says_why():
    model = _model()
    params = list(model.parameters())
    buffer = torch.zeros(sum(p.numel() for p in params) + 4)
    assert ShardedOptimizer.possible(params, buffer, 2) == "gradients that are not views of one buffer"
    _attach(params, buffer)
    assert ShardedOptimizer.possible(params, buffer, 2) is None
    assert ShardedOptimizer.possible(params, buffer, 1000) == "fewer parameters than ranks"
    assert ShardedOptimizer.possible([p.double() for p in params], buffer, 2) is not None


def test_no_room_for_shared_files_fails_at_setup_on_every_rank(tmp_path):
    # Rank 0's view of a 2-rank group whose files cannot be made: the error comes before any step.
    group = shm.ShmGroup(0, 2, "test", lambda obj: [obj, obj], directory=str(tmp_path / "no-such-dir"))
    model = _model()
    params = list(model.parameters())
    buffer = group.alloc(sum(p.numel() for p in params) + 4)
    _attach(params, buffer)
    before = [p.detach().clone() for p in params]
    with pytest.raises(shm.Unavailable, match="cannot create a shared file"):
        ShardedOptimizer(group, params, buffer, lambda ps: _make("sgd", ps))
    assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))  # the model is untouched
    group.close()


def test_a_failure_after_some_shared_files_leaves_nothing_shared(tmp_path):
    # The moments' file cannot be made after the parameters' was: the parameters stay the model's own.
    group = shm.ShmGroup(0, 1, "test", lambda obj: [obj], directory=str(tmp_path))
    model = _model()
    params = list(model.parameters())
    buffer = group.alloc(sum(p.numel() for p in params) + 4)
    _attach(params, buffer)
    made = group._segment
    calls = iter(range(100))

    def failing_third(*args: Any, **kwargs: Any) -> shm.Segment:
        if next(calls) == 1:  # the first file made here is the parameters', the second a moment's
            raise OSError(28, "No space left on device")
        return made(*args, **kwargs)

    group._segment = failing_third  # type: ignore[method-assign]
    storages = {p.untyped_storage().data_ptr() for p in params}
    with pytest.raises(shm.Unavailable, match="No space left"):
        ShardedOptimizer(group, params, buffer, lambda ps: _make("sgd", ps))
    assert {p.untyped_storage().data_ptr() for p in params} == storages
    assert not group._shared
    group.close()
