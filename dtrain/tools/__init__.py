"""Tools around the library, each a command; none is imported by training itself:

* ``bench.py``: ``python -m dtrain.bench``, B1-B6 against the peers (its pure logic: ``benchstats.py``);
* ``report.py``: ``python -m dtrain.report``, summaries and plots of run directories;
* ``configref.py``: ``python -m dtrain.configref``, docs/config.md from the config dataclasses;
* ``datagen.py``: ``python -m dtrain.datagen`` (``dtrain-datagen``), the synthetic dataset as Parquet.

The documented ``python -m dtrain.X`` commands are thin modules beside the package that call these.
"""
