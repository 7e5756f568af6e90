"""--l1 and --l2 (dtrain/train/regularize.py): the proximal L1 step, the L2 penalty against scikit-learn,
which parameters are weights, and the sharded layout giving the same update as the whole step."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from dtrain.config import Config, ConfigError, OptimConfig
from dtrain.train import regularize
from dtrain.train.step import make_optimizer

pytestmark = pytest.mark.unit


def fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, optim: OptimConfig, steps: int) -> None:
    """Full-batch training of ``model`` with the optimizer and penalties a run would make."""
    params = list(model.parameters())
    optimizer = make_optimizer(Config(optim=optim), params)
    regularize.attach(optimizer, params, optim.l1, optim.l2)
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()


def test_soft_threshold_and_ranges():
    w = torch.tensor([-3.0, -0.5, 0.0, 0.2, 2.0])
    regularize.soft_threshold_(w, 1.0)
    assert w.tolist() == [-2.0, 0.0, 0.0, 0.0, 1.0]
    params = [torch.zeros(3, 2), torch.zeros(3), torch.zeros(1, 1, 2, 2), torch.zeros(4)]
    assert regularize.weight_ranges(params) == [(0, 6), (9, 13)]
    assert regularize.clip_ranges([(0, 6), (9, 13)], 4, 11) == [(0, 2), (5, 7)]
    assert regularize.zero_share([torch.tensor([[0.0, 1.0]]), torch.zeros(5)]) == 0.5


def test_l1_refused_where_it_has_no_proximal_step():
    with pytest.raises(ConfigError, match=r"^--l1: .*--optimizer sgd or adagrad"):
        OptimConfig(optimizer="adam", l1=0.1)
    with pytest.raises(ConfigError, match=r"^--l2: must be >= 0"):
        OptimConfig(l2=-1)


def sparse_problem(rows: int = 2000, features: int = 20, relevant: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(rows, features))
    y = (x[:, :relevant].sum(axis=1) > 0).astype(np.int64)
    return torch.tensor(x, dtype=torch.float32), torch.tensor(y)


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad"])
def test_l1_gives_exact_zeros_on_irrelevant_features(optimizer):
    x, y = sparse_problem()
    torch.manual_seed(0)
    model = nn.Linear(20, 2)
    fit(model, x, y, OptimConfig(optimizer=optimizer, lr=0.1, momentum=0.0, l1=0.05), 400)
    w = model.weight.detach()
    assert (w[:, 3:] == 0).all(), w
    assert (w[:, :3] != 0).all()
    assert (model.bias != 0).all()  # biases are not penalised
    assert regularize.zero_share(list(model.parameters())) == pytest.approx(34 / 40)


def test_l1_alone_leaves_irrelevant_features_nonzero():
    """The control: without --l1 the same training leaves every weight nonzero."""
    x, y = sparse_problem()
    torch.manual_seed(0)
    model = nn.Linear(20, 2)
    fit(model, x, y, OptimConfig(optimizer="sgd", lr=0.1, momentum=0.0), 400)
    assert regularize.zero_share(list(model.parameters())) == 0


def test_sharded_layout_steps_as_the_whole():
    """Two shards of the parameters laid end to end, each penalised over its own ranges, give the same
    parameters as the whole step (the sharded step, dtrain/sharded.py)."""
    torch.manual_seed(1)
    whole = [torch.randn(4, 3), torch.randn(4), torch.randn(2, 4), torch.randn(2)]
    grads = [torch.randn_like(p) for p in whole]
    cfg = OptimConfig(optimizer="sgd", lr=0.3, momentum=0.0, l1=0.2, l2=0.5)

    ps = [nn.Parameter(p.clone()) for p in whole]
    for p, g in zip(ps, grads, strict=True):
        p.grad = g.clone()
    optimizer = make_optimizer(Config(optim=cfg), ps)
    regularize.attach(optimizer, ps, cfg.l1, cfg.l2)
    optimizer.step()
    expected = torch.cat([p.detach().reshape(-1) for p in ps])

    flat = torch.cat([p.reshape(-1) for p in whole])
    flat_grad = torch.cat([g.reshape(-1) for g in grads])
    ranges = regularize.weight_ranges(whole)
    for lo, hi in ((0, 13), (13, flat.numel())):
        shard = nn.Parameter(flat[lo:hi].clone())
        shard.grad = flat_grad[lo:hi].clone()
        inner = make_optimizer(Config(optim=cfg), [shard])
        regularize.Penalty(cfg.l1, cfg.l2, [(shard, regularize.clip_ranges(ranges, lo, hi))]).attach(inner)
        inner.step()
        flat[lo:hi] = shard.detach()
    torch.testing.assert_close(flat, expected, rtol=0, atol=0)


def test_l2_matches_scikit_learn_logistic_regression():
    """``--l2 = 1 / (C * n)`` gives scikit-learn's LogisticRegression(C) (multinomial, the intercept
    unpenalised), to 1e-3 after convergence."""
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(3)
    n, features, classes, c = 300, 4, 3, 0.5
    centres = rng.normal(scale=1.5, size=(classes, features))
    y = rng.integers(0, classes, size=n)
    x = centres[y] + rng.normal(size=(n, features))
    ref = LogisticRegression(C=c, tol=1e-10, max_iter=10_000).fit(x, y)

    torch.manual_seed(0)
    model = nn.Linear(features, classes).double()
    fit(model, torch.tensor(x), torch.tensor(y), OptimConfig(optimizer="sgd", lr=0.5, momentum=0.9,
                                                             l2=1 / (c * n)), 3000)
    np.testing.assert_allclose(model.weight.detach().numpy(), ref.coef_, atol=1e-3)
    # Softmax logits are defined up to a constant per row: the unpenalised intercepts up to their mean.
    b = model.bias.detach().numpy()
    np.testing.assert_allclose(b - b.mean(), ref.intercept_ - ref.intercept_.mean(), atol=1e-3)
