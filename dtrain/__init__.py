"""dtrain: distributed data-parallel SGD for PyTorch, fed by Dask, synchronised by Horovod."""

from typing import Any

__version__ = "0.1.0"


def load(path: str) -> Any:
    """The trained model of a run directory, a checkpoint or a ``model.pt2``, with ``predict`` and
    ``predict_proba`` on numpy arrays and pandas DataFrames (see :mod:`dtrain.portable`)."""
    from dtrain.portable import load as _load  # torch is imported only when a model is loaded

    return _load(path)


def fit(data: str | None = None, **fields: Any) -> Any:
    """Train on ``data`` with settings named as the flags (``epochs=5``); a :class:`dtrain.api.Fitted`
    holding the summary and the model (``.predict``, ``.predict_proba``)."""
    from dtrain.api import fit as _fit

    return _fit(data, **fields)


def train(cfg: Any) -> Any:
    """Train with a :class:`dtrain.config.Config`; a :class:`dtrain.api.Fitted` (summary and model)."""
    from dtrain.api import train as _train

    return _train(cfg)
