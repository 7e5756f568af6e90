"""The training step's shortcuts compute exactly what the plain operations they replace would."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dtrain import models
from dtrain.config import ModelConfig
from dtrain.data.stream import Batch
from dtrain.train.step import StepCounts, forward_backward

pytestmark = pytest.mark.unit


def _reference(model: nn.Module, batch: Batch, task: str, micro_batches: int, denominator: int,
               amp: str | None = None) -> tuple[float, float]:
    """forward_backward as plainly written: split, autocast, divide the loss sum, backward, count with a sum."""
    total, right = 0.0, 0.0
    for x, y in zip(batch.x.tensor_split(micro_batches), batch.y.tensor_split(micro_batches), strict=True):
        with torch.autocast(amp or "cpu", dtype=torch.bfloat16, enabled=amp is not None):
            out = model(x)
            if task == "classification":
                loss = F.cross_entropy(out.float(), y, reduction="sum")
            else:
                loss = F.mse_loss(out.float().squeeze(-1), y, reduction="sum")
        if task == "classification" and len(y):
            right += float((out.argmax(dim=1) == y).sum())
        (loss / denominator).backward()
        total += float(loss.detach())
    return total, right


@pytest.mark.parametrize("amp", [None, "cpu"])
@pytest.mark.parametrize("task", ["classification", "regression"])
@pytest.mark.parametrize(("rows", "micro_batches", "denominator"), [(128, 1, 128), (100, 1, 300), (37, 3, 111),
                                                                     (2, 3, 7)])
def test_forward_backward_gives_the_plain_losses_counts_and_gradients_bit_for_bit(task, rows, micro_batches,
                                                                                   denominator, amp):
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 12, generator=g)
    y = torch.randint(0, 5, (rows,), generator=g) if task == "classification" else torch.randn(rows, generator=g)
    batch = Batch(0, 0, x, y, np.arange(rows), denominator)
    results, grads = [], []
    for fn in (forward_backward, _reference):
        torch.manual_seed(0)
        model = models.mlp(12, 5 if task == "classification" else 1, [16, 16])
        results.append(fn(model, batch, task, micro_batches, denominator, amp))
        grads.append([p.grad for p in model.parameters()])
    assert results[0] == results[1]
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))


def test_step_counts_keep_float32_sums_in_the_tensor_the_allreduce_carries():
    buffer = torch.zeros(10)
    tensor = buffer[6:]  # the tail of a gradient buffer, as gradient_buffers makes it
    counts, plain = StepCounts(tensor), torch.zeros(4)
    rng = np.random.default_rng(0)
    adds = [(float(loss), float(right), int(rows)) for loss, right, rows in zip(
        rng.lognormal(0, 8, 2000), rng.integers(0, 300, 2000), rng.integers(0, 300, 2000), strict=True)]
    for loss, right, rows in [*adds, (0.1, 3.0, 128), (3e38, 0.0, 1), (3e38, 0.0, 1)]:  # ends in overflow, to inf
        counts.add(loss, right, rows)
        plain.add_(torch.tensor([loss, right, rows, 0.0]))
        assert torch.equal(tensor, plain), (loss, right, rows)
    counts.vote(1.0)
    plain[3] = 1.0
    assert torch.equal(tensor, plain) and tensor[0].isinf()  # written through to the tensor, float32 sums
    assert not buffer[:6].any()
    tensor.mul_(2)  # as an allreduce over two ranks would, in place
    assert counts.take() == tuple(plain.mul(2).tolist())
    assert not tensor.any() and counts.take() == (0.0, 0.0, 0.0, 0.0)


def test_only_models_made_of_known_layers_count_as_drawing_no_random_numbers():
    assert not models.draws_random(models.mlp(4, 2, [8]))
    assert models.draws_random(models.mlp(4, 2, [8], dropout=0.1))
    assert not models.draws_random(models.build(ModelConfig(model="cnn"), 16, 3))
    assert not models.draws_random(models.build(ModelConfig(model="linear"), 4, 1))

    class Own(nn.Linear):  # a forward of its own: unknown
        pass

    assert models.draws_random(nn.Sequential(Own(4, 2)))
    assert models.draws_random(nn.Sequential(nn.Linear(4, 2), nn.GELU()))


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_optimizers_are_fused_and_keep_the_plain_state(optimizer, monkeypatch):
    from dtrain.config import Config, OptimConfig
    from dtrain.train import step as engine_step

    torch.manual_seed(0)
    fused_model, plain_model = nn.Linear(5, 3), nn.Linear(5, 3)
    plain_model.load_state_dict(fused_model.state_dict())
    cfg = Config(optim=OptimConfig(optimizer=optimizer, lr=0.05, momentum=0.9, weight_decay=0.01))
    fused = engine_step.make_optimizer(cfg, fused_model.parameters())
    monkeypatch.setattr(engine_step, "_fusable", lambda params: False)
    plain = engine_step.make_optimizer(cfg, plain_model.parameters())
    assert fused.param_groups[0]["fused"] is True and not plain.param_groups[0]["fused"]
    x = torch.randn(8, 5)
    for opt, model in ((fused, fused_model), (plain, plain_model)):
        for _ in range(3):
            opt.zero_grad()
            model(x).square().sum().backward()
            opt.step()
    # One kernel instead of several operations: the same update up to rounding, the same state layout.
    for a, b in zip(fused_model.parameters(), plain_model.parameters(), strict=True):
        torch.testing.assert_close(a, b)
    fs, ps = fused.state_dict()["state"], plain.state_dict()["state"]
    assert fs.keys() == ps.keys() and all(fs[k].keys() == ps[k].keys() for k in fs)
