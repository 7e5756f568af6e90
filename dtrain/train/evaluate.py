"""Held-out evaluation: loss and accuracy (or R²) over the validation rows, combined across ranks."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from dtrain import dist
from dtrain.config import Config
from dtrain.data.dataset import Stats
from dtrain.data.plan import EpochPlan
from dtrain.data.stream import Stream
from dtrain.train.step import correct, loss_sum


def evaluate(model: nn.Module, stream: Stream, sizes: list[int], cfg: Config, stats: Stats) -> dict[str, float]:
    """Held-out loss (and accuracy), combined across ranks by counts, not by averaging averages."""
    if sum(sizes) == 0:
        return {}
    plan = EpochPlan(tuple(sizes), cfg.train.eval_batch_size, shuffle=False)
    totals = np.zeros(4)  # loss sum, correct, rows, sum of squared deviation of targets (R²)
    y_dtype = np.dtype(np.int64 if stats.task == "classification" else np.float32)
    ys: list[torch.Tensor] = []
    model.eval()
    with torch.no_grad():
        for b in stream.batches(plan, y_dtype=y_dtype):
            out = model(b.x)
            totals[:3] += (float(loss_sum(stats.task, out, b.y)), correct(stats.task, out, b.y), b.rows)
            if stats.task == "regression":
                ys.append(b.y)
    model.train()
    result: dict[str, float] = {}
    if stats.task == "regression":
        y = torch.cat(ys) if ys else torch.zeros(0)
        s1, s2, n = dist.allreduce_sum([float(y.sum()), float((y.double() ** 2).sum()), len(y)])
        totals[3] = s2 - s1 * s1 / max(n, 1)
    loss, right, rows, ss_tot = dist.allreduce_sum(totals.tolist(), name="eval")
    result["eval_rows"] = rows
    result["eval_loss"] = loss / rows
    if stats.task == "classification":
        result["eval_accuracy"] = right / rows
    else:
        result["eval_r2"] = 1 - loss / ss_tot if ss_tot > 0 else float("nan")
    return result

