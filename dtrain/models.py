"""Models: plain ``torch.nn.Module`` factories that know nothing of distribution."""

from __future__ import annotations

import importlib
import math
from collections.abc import Sequence

import torch
from torch import nn

from dtrain.config import ModelConfig, UserError


def mlp(inputs: int, outputs: int, hidden: Sequence[int], dropout: float = 0.0) -> nn.Module:
    layers: list[nn.Module] = []
    width = inputs
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        width = h
    layers.append(nn.Linear(width, outputs))
    return nn.Sequential(*layers)


class SmallCNN(nn.Module):
    """Two conv blocks over a square single-channel image made from the feature vector."""

    def __init__(self, inputs: int, outputs: int):
        super().__init__()
        self.side = math.isqrt(inputs)
        if self.side * self.side != inputs:
            raise UserError(f"--model cnn: needs a square number of features (an image), got {inputs}; "
                            "use --model mlp for tabular data")
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4),
            nn.Flatten(), nn.Linear(32 * 16, outputs),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.view(-1, 1, self.side, self.side))


def build(cfg: ModelConfig, inputs: int, outputs: int) -> nn.Module:
    """The model named by ``--model`` for ``inputs`` features and ``outputs`` outputs."""
    if cfg.model == "mlp":
        return mlp(inputs, outputs, cfg.hidden, cfg.dropout)
    if cfg.model in ("linear", "logistic"):
        return nn.Linear(inputs, outputs)
    if cfg.model == "cnn":
        return SmallCNN(inputs, outputs)
    module_name, _, attr = cfg.model.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise UserError(f"--model: cannot load {cfg.model!r} ({e}); check the import path") from None
    model = factory((inputs,), outputs)
    if not isinstance(model, nn.Module):
        raise UserError(f"--model: {cfg.model} returned {type(model).__name__}, not a torch.nn.Module")
    return model


# Modules whose own forward draws no random numbers. Exact classes: a subclass may override forward.
_NO_RANDOMNESS: frozenset[type[nn.Module]] = frozenset({
    nn.Sequential, nn.Linear, nn.ReLU, nn.Conv2d, nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.Flatten, SmallCNN,
})


def draws_random(model: nn.Module) -> bool:
    """Whether ``model``'s training forward may draw random numbers (dropout, or anything unknown).

    False only when it is made of modules known to draw none, as ``mlp`` without dropout, ``linear``
    and ``cnn`` are: then there is no randomness for the training loop to seed. Any other module (a
    dropout layer, a model of one's own from ``module:factory``) counts as random.
    """
    return any(type(m) not in _NO_RANDOMNESS for m in model.modules())
