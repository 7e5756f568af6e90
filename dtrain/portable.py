"""The trained model as a self-contained artifact, and ``dtrain.load`` to predict with it.

Every run writes ``model.pt2`` beside ``model.pt``: a ``torch.export`` program that takes the raw
feature columns (float32, in the order of ``stats.json``'s ``features``) and does itself what dtrain's
preparation did to them: it replaces missing values by ``--fillna``, standardises with the training
split's mean and std, runs the model and maps outputs back to the data's terms. It returns a pair:

- classification: ``(prediction, probabilities)``; ``prediction`` holds the class labels themselves
  when they are numbers, else the index into the ``classes`` list of the artifact's metadata;
- regression: ``(prediction, empty [rows, 0] tensor)``.

The metadata (``features``, ``label``, ``task``, ``classes``) travels inside the file as
``dtrain.json``. Plain torch loads it, without dtrain::

    extra = {"dtrain.json": ""}
    program = torch.export.load("model.pt2", extra_files=extra)
    prediction, proba = program.module()(torch.tensor(rows, dtype=torch.float32))

Why ``torch.export`` and not TorchScript: torch 2.10+ marks ``torch.jit.script``/``save`` deprecated
(warnings at every save and load), while ``torch.export.save``/``load`` is its supported successor,
loads with torch alone, and keeps the batch dimension dynamic (``Dim``). A model that cannot be
exported (data-dependent Python control flow in a ``--model module:factory``) gets a warning and no
artifact; ``model.pt`` and :func:`load` still work for it.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from dtrain.config import Config, UserError

log = logging.getLogger(__name__)

ARTIFACT = "model.pt2"
META = "dtrain.json"


class Prepared(nn.Module):
    """Raw features in, the data's terms out: what dtrain's preparation and the class mapping do."""

    mean: torch.Tensor
    std: torch.Tensor
    labels: torch.Tensor

    def __init__(self, model: nn.Module, stats: Mapping[str, Any], fillna: float | None):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(stats["mean"], dtype=torch.float32))
        self.register_buffer("std", torch.tensor(stats["std"], dtype=torch.float32))
        self.fill = fillna
        self.classification = stats["task"] == "classification"
        classes = stats["classes"] or []
        numeric = all(isinstance(c, int | float) and not isinstance(c, bool) for c in classes)
        # Labels that are numbers come out as themselves; any other label as its index in ``classes``.
        values = torch.tensor(classes) if numeric and classes else torch.arange(len(classes))
        self.register_buffer("labels", values)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.to(torch.float32)
        if self.fill is not None:
            x = torch.where(torch.isnan(x), torch.full_like(x, self.fill), x)
        out = self.model((x - self.mean) / self.std)
        if self.classification:
            proba = torch.softmax(out.float(), dim=1)
            return self.labels[proba.argmax(dim=1)], proba
        return out.float().reshape(-1), out.new_zeros((out.shape[0], 0))


def metadata(stats: Mapping[str, Any], cfg: Mapping[str, Any]) -> dict[str, Any]:
    return {"features": list(stats["features"]), "label": stats["label"], "task": stats["task"],
            "classes": stats["classes"], "fillna": cfg["data"]["fillna"], "model": cfg["model"]}


def export(model: nn.Module, stats: Mapping[str, Any], cfg: Mapping[str, Any], path: str) -> bool:
    """Write the artifact of ``model`` to ``path`` (atomically); False (and a warning) if it cannot be exported."""
    wrapped = Prepared(model.cpu().eval(), stats, cfg["data"]["fillna"]).eval()
    example = torch.zeros((2, len(stats["features"])))
    try:
        with torch.no_grad():
            program = torch.export.export(wrapped, (example,), dynamic_shapes=({0: torch.export.Dim("rows")},))
    except Exception as e:  # torch.export raises many kinds (Unsupported, UserError, ...)
        log.warning("no %s: the model cannot be exported (%s); model.pt and dtrain.load still work",
                    ARTIFACT, str(e).splitlines()[0] if str(e) else type(e).__name__)
        return False
    tmp = os.path.join(os.path.dirname(path) or ".", ".partial-" + os.path.basename(path))  # torch wants .pt2
    torch.export.save(program, tmp, extra_files={META: json.dumps(metadata(stats, cfg))})
    os.replace(tmp, path)  # a half-written artifact never replaces a good one
    return True


def save_run_artifact(run_dir: str, state: Mapping[str, torch.Tensor], stats: Any, cfg: Config) -> None:
    """The run's ``model.pt2`` from its model's ``state`` (the one in model.pt), loaded into a fresh CPU
    copy, as training's parameters may live on a GPU or in memory shared among ranks (the sharded step)."""
    from dtrain import models

    copy = models.build(cfg.model, len(stats.features), stats.num_outputs)
    copy.load_state_dict({k: v.detach().cpu() for k, v in state.items()})
    export(copy, stats.to_dict(), cfg.to_dict(), os.path.join(run_dir, ARTIFACT))


# -- reading what a run left ----------------------------------------------------------------------------


def _read_run(path: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, torch.Tensor]]:
    """``(config, stats, state_dict)`` of a run dir or of a checkpoint (a ``step-*`` dir or its state.pt)."""
    import yaml

    from dtrain import checkpoint

    if not os.path.exists(path):
        raise UserError(f"RUN_DIR: no such directory {path!r}; pass a run directory or a checkpoint")
    if os.path.isfile(os.path.join(path, "state.pt")) or os.path.basename(path) == "state.pt":
        state = checkpoint.load(path[: -len("/state.pt")] if path.endswith("/state.pt") else path)
        return state["config"], state["stats"], state["model"]
    missing = [n for n in ("config.yaml", "stats.json", "model.pt") if not os.path.isfile(os.path.join(path, n))]
    if missing:
        raise UserError(f"RUN_DIR: {path!r} has no {missing[0]}; pass the directory of a finished run "
                        "(or one of its checkpoints/step-* directories)")
    with open(os.path.join(path, "config.yaml")) as f:
        cfg = yaml.safe_load(f)
    with open(os.path.join(path, "stats.json")) as f:
        stats = json.load(f)
    return cfg, stats, torch.load(os.path.join(path, "model.pt"), map_location="cpu", weights_only=True)


def build_prepared(path: str) -> tuple[nn.Module, dict[str, Any]]:
    """The model of a run dir or checkpoint, wrapped as the artifact would be, and its metadata."""
    from dtrain import models

    cfg, stats, state = _read_run(path)
    model = models.build(Config.from_dict(cfg).model, len(stats["features"]), len(stats["classes"] or [0]))
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(f"RUN_DIR: the saved model does not fit its config ({str(e).splitlines()[0]}); "
                        "pass an unmodified run directory") from None
    return Prepared(model.eval(), stats, cfg["data"]["fillna"]).eval(), metadata(stats, cfg)


def load_module(path: str) -> tuple[Any, dict[str, Any]]:
    """A callable ``rows -> (prediction, probabilities)`` and its metadata, from a run dir's artifact,
    a ``.pt2`` file, or (without an artifact) rebuilt from ``model.pt``/a checkpoint."""
    artifact = path if path.endswith(".pt2") else os.path.join(path, ARTIFACT)
    if os.path.isfile(artifact):
        extra = {META: ""}
        program = torch.export.load(artifact, extra_files=extra)
        return program.module(), json.loads(extra[META])
    return build_prepared(path)


class Model:
    """A trained model that predicts from raw feature rows (numpy arrays or pandas DataFrames)."""

    def __init__(self, module: Any, meta: dict[str, Any]):
        self.module = module
        self.features: list[str] = meta["features"]
        self.label: str = meta["label"]
        self.task: str = meta["task"]
        self.classes: list[Any] | None = meta["classes"]
        self.fillna: float | None = meta["fillna"]

    def _rows(self, x: Any) -> torch.Tensor:
        if isinstance(x, pd.DataFrame):
            missing = [c for c in self.features if c not in x.columns]
            if missing:
                raise ValueError(f"no column {missing[0]!r} among the DataFrame's columns; the model uses "
                                 f"{', '.join(self.features)}")
            x = x[self.features].to_numpy(dtype=np.float32, na_value=np.nan)
        x = np.asarray(x, dtype=np.float32)
        if x.ndim == 1:
            x = x.reshape(1, -1)
        if x.ndim != 2 or x.shape[1] != len(self.features):
            raise ValueError(f"expected rows of {len(self.features)} features ({', '.join(self.features)}), "
                             f"got shape {x.shape}")
        if self.fillna is None and np.isnan(x).any():
            raise ValueError("missing values in the features, and the model was trained without --fillna; "
                             "fill them first")
        return torch.from_numpy(np.ascontiguousarray(x))

    def _run(self, x: Any) -> tuple[np.ndarray, np.ndarray]:
        with torch.no_grad():
            pred, proba = self.module(self._rows(x))
        return pred.numpy(), proba.numpy()

    def predict(self, x: Any) -> np.ndarray:
        """Class labels (classification) or values (regression), one per row."""
        pred, _ = self._run(x)
        if self.classes and not np.issubdtype(np.asarray(self.classes).dtype, np.number):
            return np.asarray(self.classes, dtype=object)[pred]
        return pred

    def predict_proba(self, x: Any) -> np.ndarray:
        """Class probabilities, one column per class in :attr:`classes` order (classification only)."""
        if self.task != "classification":
            raise ValueError("predict_proba: the model is a regression; use predict")
        return self._run(x)[1]


def load(path: str) -> Model:
    """The model of a run directory, a checkpoint directory, or a ``model.pt2`` file."""
    return Model(*load_module(path))
