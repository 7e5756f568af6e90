"""The training state that a rollback restores and a joining rank receives (elastic runs), or a plain
holder of it (a fixed world).

Built on what ``dtrain.dist`` hands out (Horovod's ``State`` class and its ``broadcast_object``), so that
Horovod is still imported by ``dist`` alone.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch

from dtrain import dist


class LocalState:
    """The training state of a fixed world: attributes, no commits, no rollbacks."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, **attrs: Any):
        self.model, self.optimizer = model, optimizer
        self.__dict__.update(attrs)

    def commit(self) -> None:
        pass

    def save(self) -> None:
        pass

    def register_reset_callbacks(self, callbacks: list[Callable[[], None]]) -> None:
        pass


def training_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, **attrs: Any) -> Any:
    """What a rollback restores and a joining rank receives: model, optimizer and ``attrs``.

    Elastic runs get a Horovod ``State`` whose ``sync`` broadcasts rank 0's model, optimizer state and
    attributes as one object. (Horovod's ``TorchState`` instead calls ``broadcast_optimizer_state``,
    which on a fresh optimizer takes a zero-gradient step: AdamW's weight decay then moves weights.)
    """
    if not dist.is_elastic():
        return LocalState(model, optimizer, **attrs)
    from dtrain.checkpoint import snapshot

    broadcast = dist.broadcast_object_fn()

    class ElasticState(dist.elastic_state_base()):  # type: ignore[misc]
        def __init__(self) -> None:
            self.model, self.optimizer = model, optimizer
            self._names = list(attrs)
            self.__dict__.update(attrs)
            super().__init__(bcast_object=broadcast, get_rank=dist.rank)
            self.save()

        def _capture(self) -> dict[str, Any]:
            return {"model": snapshot(self.model.state_dict()), "optimizer": snapshot(self.optimizer.state_dict()),
                    "attrs": {k: getattr(self, k) for k in self._names}}

        def save(self) -> None:
            self._saved = self._capture()

        def restore(self) -> None:
            self.model.load_state_dict(self._saved["model"])
            self.optimizer.load_state_dict(copy.deepcopy(self._saved["optimizer"]))
            self.__dict__.update(self._saved["attrs"])

        def sync(self) -> None:
            self._saved = broadcast(self._capture() if dist.rank() == 0 else None, root_rank=0, name="elastic-state")
            self.restore()

    return ElasticState()
