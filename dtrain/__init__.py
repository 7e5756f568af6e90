"""dtrain: distributed data-parallel SGD for PyTorch, fed by Dask, synchronised by Horovod."""

from typing import Any

__version__ = "0.1.0"


def load(path: str) -> Any:
    """The trained model of a run directory, a checkpoint or a ``model.pt2``, with ``predict`` and
    ``predict_proba`` on numpy arrays and pandas DataFrames (see :mod:`dtrain.portable`)."""
    from dtrain.portable import load as _load  # torch is imported only when a model is loaded

    return _load(path)
