"""The Python API for notebooks: ``dtrain.fit(data=..., epochs=...)`` or ``dtrain.train(Config(...))``.

Both run the same training as ``python -m dtrain`` in this process (one rank; under ``horovodrun``
every rank calls it) and hand back a :class:`Fitted`: the run's summary and its model, loaded with
:func:`dtrain.load`, ready to ``predict``. Keyword arguments are the config fields by their flag names
(``global_batch_size=128`` for ``--global-batch-size 128``), converted and validated as flags are.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

from dtrain.config import Config, UserError, coerce, section_fields
from dtrain.portable import Model, load


@dataclass
class Fitted:
    """What a run left: its summary (``summary.json``), its model, and where it lies."""

    summary: dict[str, Any]
    model: Model
    run_dir: str

    def predict(self, x: Any) -> Any:
        return self.model.predict(x)

    def predict_proba(self, x: Any) -> Any:
        return self.model.predict_proba(x)


def train(cfg: Config) -> Fitted:
    """Train as ``python -m dtrain`` would with ``cfg``; the summary and the model."""
    import dataclasses

    from dtrain.engine import run

    if cfg.run.run_dir is None:  # the model is loaded from the run dir: it must be known here
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
        cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, run_dir=os.path.join("runs", stamp)))
    assert cfg.run.run_dir is not None
    summary = run(cfg)
    return Fitted(summary, load(cfg.run.run_dir), cfg.run.run_dir)


def config(**fields: Any) -> Config:
    """A Config from field names (those of the flags, with underscores), validated."""
    sections = {f.name: (section, cls) for section, cls, f in section_fields()}
    raw: dict[str, dict[str, Any]] = {}
    for name, value in fields.items():
        if name not in sections:
            raise UserError(f"dtrain.fit: no setting {name!r}; the settings are the flags of python -m dtrain "
                            "--help with underscores (global_batch_size=...)")
        section, cls = sections[name]
        raw.setdefault(section, {})[name] = coerce(cls, name, value)
    return Config.from_dict(raw)


def fit(data: str | None = None, **fields: Any) -> Fitted:
    """Train on ``data`` (any ``--data``; None: the generated data) with the settings ``fields``."""
    return train(config(data=data, **fields))
