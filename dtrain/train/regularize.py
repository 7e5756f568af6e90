"""L1 and L2 penalties on the weights (not the biases), applied around the optimizer's step.

The objective is the mean loss over the rows plus ``l1 * |W|_1 + l2 / 2 * |W|_2^2`` over the weights:

* L2 adds ``l2 * w`` to each weight's gradient before the step (a penalty in the loss, not decoupled
  weight decay: Adam sees it through its moments). scikit-learn's ``LogisticRegression(C=C)`` minimises
  ``C * sum(loss) + |W|^2 / 2``; divided by ``C * n`` that is the mean loss plus ``|W|^2 / (2 C n)``,
  so ``--l2 = 1 / (C * n)`` for ``n`` training rows.
* L1 is a proximal step after the update (soft thresholding, the truncated gradient of Langford, Li and
  Zhang, JMLR 2009, as Vowpal Wabbit and scikit-learn's ``SGDClassifier(penalty='l1')`` apply it):
  ``w <- sign(w) * max(|w| - eta * l1, 0)`` with ``eta`` the step's learning rate, so weights the data
  does not hold up become exactly zero, where a subgradient in the loss only makes them oscillate
  around it. For Adagrad ``eta`` is its per-element rate ``lr / (sqrt(sum) + eps)``, the proximal
  Adagrad of Duchi, Hazan and Singer (2011). Adam and AdamW divide by a moving second moment that
  makes no proximal operator of the L1 norm: refused (``config.py``).

Weights are the parameters of two or more dimensions (linear and convolution kernels, embeddings);
one-dimensional ones (biases, normalisation scales and shifts) go unpenalised, as scikit-learn
leaves the intercept.

Both are elementwise, from the summed gradients and the parameters every rank holds alike, so each
rank (or each shard of the sharded step, ``dtrain/sharded.py``) applies the same operation to the same
values and the result does not depend on the world size. They keep no state: checkpoints, resumes and
elastic commits carry nothing for them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

log = logging.getLogger(__name__)

Ranges = list[tuple[int, int]]  # flat element ranges [start, end) of one tensor that are weights


def is_weight(p: torch.Tensor) -> bool:
    """Whether a parameter is penalised: a weight (2 or more dimensions), not a bias or norm scale."""
    return p.dim() >= 2


def weight_ranges(params: Sequence[torch.Tensor]) -> Ranges:
    """The flat ranges that weights occupy when ``params`` are laid end to end (the sharded layout)."""
    out: Ranges = []
    offset = 0
    for p in params:
        if is_weight(p):
            out.append((offset, offset + p.numel()))
        offset += p.numel()
    return out


def clip_ranges(ranges: Ranges, lo: int, hi: int) -> Ranges:
    """``ranges`` cut to ``[lo, hi)`` and counted from ``lo``: the weights within one shard."""
    return [(max(a, lo) - lo, min(b, hi) - lo) for a, b in ranges if min(b, hi) > max(a, lo)]


def soft_threshold_(w: torch.Tensor, threshold: torch.Tensor | float) -> None:
    """``w <- sign(w) * max(|w| - threshold, 0)`` in place: the proximal operator of ``threshold * |w|_1``."""
    shrunk = (w.abs() - threshold).clamp_(min=0)
    w.copy_(w.sign() * shrunk)


class Penalty:
    """L1/L2 on given element ranges of an optimizer's parameters, hooked into its ``step``.

    ``targets``: per optimizer parameter, the flat ranges of it that are weights. Stateless.
    """

    def __init__(self, l1: float, l2: float, targets: Sequence[tuple[torch.Tensor, Ranges]]):
        self.l1, self.l2 = l1, l2
        self.targets = [(p, r) for p, r in targets if r]

    def before_step(self, optimizer: torch.optim.Optimizer) -> None:
        """L2: the penalty's gradient ``l2 * w`` added to the weights' gradients."""
        if not self.l2:
            return
        with torch.no_grad():
            for p, ranges in self.targets:
                if p.grad is None:
                    continue
                g, w = p.grad.view(-1), p.view(-1)
                for a, b in ranges:
                    g[a:b].add_(w[a:b], alpha=self.l2)

    def after_step(self, optimizer: torch.optim.Optimizer) -> None:
        """L1: soft thresholding by the step's learning rate times ``l1``."""
        if not self.l1:
            return
        lrs = {id(p): group for group in optimizer.param_groups for p in group["params"]}
        with torch.no_grad():
            for p, ranges in self.targets:
                group = lrs.get(id(p))
                if group is None:
                    continue
                w = p.view(-1)
                state = optimizer.state.get(p, {})
                adagrad = isinstance(optimizer, torch.optim.Adagrad)
                for a, b in ranges:
                    if adagrad and "sum" in state:
                        step = float(state["step"])
                        eta = group["lr"] / (1 + (step - 1) * group["lr_decay"])
                        threshold: torch.Tensor | float = (
                            eta * self.l1 / (state["sum"].view(-1)[a:b].sqrt() + group["eps"]))
                    else:
                        threshold = group["lr"] * self.l1
                    soft_threshold_(w[a:b], threshold)

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        optimizer.register_step_pre_hook(lambda opt, args, kwargs: self.before_step(opt))
        optimizer.register_step_post_hook(lambda opt, args, kwargs: self.after_step(opt))


def attach(optimizer: Any, params: Sequence[torch.Tensor], l1: float, l2: float) -> Penalty | None:
    """Hook ``--l1``/``--l2`` into ``optimizer`` (a torch optimizer over ``params``, or the sharded step
    over them, whose inner optimizer steps one shard of them laid end to end). None when both are 0."""
    if not l1 and not l2:
        return None
    shard = getattr(optimizer, "shard", None)
    if shard is not None:  # dtrain.sharded.ShardedOptimizer
        inner, tensor, (lo, hi) = shard
        penalty = Penalty(l1, l2, [(tensor, clip_ranges(weight_ranges(params), lo, hi))])
    else:
        inner = optimizer
        penalty = Penalty(l1, l2, [(p, [(0, p.numel())]) for p in params if is_weight(p)])
    penalty.attach(inner)
    log.info("penalties on the weights: l1=%g l2=%g", l1, l2)
    return penalty


def zero_share(params: Sequence[torch.Tensor]) -> float:
    """The share of the weights that are exactly zero (0 when there are none)."""
    weights = [p for p in params if is_weight(p)]
    total = sum(p.numel() for p in weights)
    return sum(int((p == 0).sum()) for p in weights) / total if total else 0.0
