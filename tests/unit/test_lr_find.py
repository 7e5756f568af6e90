"""The range test's suggestion (dtrain/tools/lr_find.py) on a problem whose best learning rate is known."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dtrain.tools.lr_find import smooth, suggest

pytestmark = pytest.mark.unit


def range_test(seed: int, steps: int = 100, start: float = 1e-4, end: float = 10.0) -> tuple[list[float], list[float]]:
    """Least squares on standard normal features: the mean squared error's curvature is 2 in every
    direction, so plain SGD's best rate is 1/2 (one step to the minimum) and above 1 it diverges."""
    rng = np.random.default_rng(0)
    x = torch.tensor(rng.normal(size=(20000, 16)), dtype=torch.float32)
    y = x @ torch.tensor(rng.normal(size=16), dtype=torch.float32) + 0.1 * torch.randn(20000)
    torch.manual_seed(seed)
    model = torch.nn.Linear(16, 1)
    lrs, losses = [], []
    for i in range(steps):
        lr = start * (end / start) ** (i / (steps - 1))
        rows = torch.randint(0, len(x), (256,))
        loss = torch.nn.functional.mse_loss(model(x[rows]).squeeze(-1), y[rows])
        model.zero_grad()
        loss.backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= lr * p.grad
        lrs.append(lr)
        losses.append(loss.item())
    return lrs, losses


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_suggestion_within_a_factor_of_3_of_the_known_best(seed):
    lrs, losses = range_test(seed)
    lr, kept = suggest(lrs, losses)
    assert 0.5 / 3 <= lr <= 0.5 * 3
    assert kept < len(lrs)  # the divergence above 1 was found and cut


def test_smoothing_and_too_early_divergence():
    assert smooth([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])
    with pytest.raises(ValueError, match="lower --start-lr"):
        suggest([1.0, 2.0, 3.0, 4.0], [1.0, math.inf, 1.0, 1.0])


def test_momentum_scales_the_suggestion_by_its_effective_step():
    """SGD with momentum m steps 1/(1 - m) times further and is stable up to (1 + m) times the rate."""
    lrs, losses = range_test(0)
    plain, kept = suggest(lrs, losses)
    assert suggest(lrs, losses, momentum=0.9) == (pytest.approx(plain / 19), kept)
    with pytest.raises(ValueError, match="momentum"):
        suggest(lrs, losses, momentum=1.0)
