"""dtrain: distributed data-parallel SGD for PyTorch, fed by Dask, synchronised by Horovod."""

__version__ = "0.1.0"
