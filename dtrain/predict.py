"""Batch prediction over the Dask cluster: ``python -m dtrain.predict RUN_DIR --data PATH --out DIR``.

The data is read as training reads it (the readers of :mod:`dtrain.data`, every format), one task per
partition on the workers: read, predict with the run's model (:mod:`dtrain.portable`: the standardisation,
fill value and class mapping travel with it), write ``DIR/part-NNNNN.parquet`` with ``row_id``,
``prediction`` (the class label, or the value) and, for classification, ``proba_<class>`` columns. Only
small per-partition totals come back, so memory is bounded by partitions as in training. When the
label column is present the totals make the metrics (accuracy, log loss and per-class counts; MSE and
R² for regression), printed as one JSON line and written to ``DIR/_metrics.json`` (underscored:
readers of the directory as Parquet skip it).

RUN_DIR is a finished run's directory (its ``model.pt2``, else ``model.pt``) or a checkpoint
(``checkpoints/step-*``).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import logging
import os
import sys
import uuid
from collections.abc import Sequence
from typing import Any

import dask
import fsspec
import numpy as np
import pandas as pd
import torch
from dask.local import get_sync

from dtrain import data, storage
from dtrain.config import ClusterConfig, DataConfig, UserError
from dtrain.data import dataset, sources
from dtrain.data.prepare import PartGraph

log = logging.getLogger(__name__)

CHUNK_ROWS = 65536  # rows per forward pass on a worker: bounds the activations' memory


def _payload(run_path: str) -> tuple[str, Any, dict[str, Any]]:
    """``(kind, what the workers load the model from, metadata)``: the artifact's bytes, or the module."""
    from dtrain import portable

    module, meta = portable.load_module(run_path)
    artifact = run_path if run_path.endswith(".pt2") else os.path.join(run_path, portable.ARTIFACT)
    if os.path.isfile(artifact):
        with open(artifact, "rb") as f:
            return "pt2", f.read(), meta
    return "module", module, meta


_MODELS: dict[str, Any] = {}  # on each worker: the loaded model by its digest, loaded once per process


def _model(digest: str, kind: str, payload: Any) -> Any:
    if digest not in _MODELS:
        _MODELS[digest] = torch.export.load(io.BytesIO(payload)).module() if kind == "pt2" else payload
    return _MODELS[digest]


def predict_part(part: PartGraph, model: tuple[str, str, Any], meta: dict[str, Any], label: str | None,
                 offset: int | None, out: str) -> dict[str, Any]:
    """Predict one partition on a worker, write its Parquet file, return its metric totals.

    Bad data comes back as ``{"error": line}``, not raised: a raised one is also logged by the worker
    with its traceback, and the user should read one line.
    """
    try:
        return _predict_part(part, model, meta, label, offset, out)
    except data.DataError as e:
        return {"error": str(e)}


def _predict_part(part: PartGraph, model: tuple[str, str, Any], meta: dict[str, Any], label: str | None,
                  offset: int | None, out: str) -> dict[str, Any]:
    df = get_sync(part.graph, part.key)
    features = meta["features"]
    try:
        x = df[features].to_numpy(dtype=np.float32, na_value=np.nan)
    except (TypeError, ValueError) as e:
        raise data.DataError(f"--data: a feature column holds values that are not numbers ({sources.first_line(e)}); "
                             "clean the data") from None
    missing = int(np.isnan(x).sum())
    if missing and meta["fillna"] is None:
        raise data.DataError(f"--data: {missing} missing feature values, and the model was trained without "
                             "--fillna; fill them in the data")
    module = _model(*model)
    preds, probas = [], []
    with torch.no_grad():
        for lo in range(0, len(x), CHUNK_ROWS):
            p, q = module(torch.from_numpy(np.ascontiguousarray(x[lo:lo + CHUNK_ROWS])))
            preds.append(p.numpy())
            probas.append(q.numpy())
    classes = meta["classes"]
    k = len(classes or [])
    pred = np.concatenate(preds) if preds else np.zeros(0)
    proba = np.concatenate(probas) if probas else np.zeros((0, k), np.float32)
    row_id = df[data.ROW_ID].to_numpy(np.int64) if offset is None else np.arange(offset, offset + len(df))
    frame = pd.DataFrame({data.ROW_ID: row_id})
    index = None
    if classes:
        index = pd.Index(classes).get_indexer(pred) if np.issubdtype(np.asarray(classes).dtype, np.number) \
            else pred.astype(np.int64)
        frame["prediction"] = np.asarray(classes, dtype=object)[index] if not np.issubdtype(
            np.asarray(classes).dtype, np.number) else pred
        for j, c in enumerate(classes):
            frame[f"proba_{c}"] = proba[:, j]
    else:
        frame["prediction"] = pred
    frame.to_parquet(out, index=False)
    totals: dict[str, Any] = {"rows": len(df)}
    if label is None:
        return totals
    y = df[label]
    if y.isna().any():
        raise data.DataError(f"--label: {int(y.isna().sum())} rows have no {label!r} value; drop them or the column")
    if classes:
        truth = pd.Index(classes).get_indexer(y.to_numpy())
        if (truth < 0).any():
            raise data.DataError(f"--label: value {y[truth < 0].tolist()[0]!r} is not one of the model's "
                                 f"{k} classes; score with data labelled as the training data was")
        assert index is not None
        p_true = np.clip(proba[np.arange(len(truth)), truth], 1e-15, 1.0)
        totals.update(correct=int((index == truth).sum()), log_loss=float(-np.log(p_true).sum()),
                      true=np.bincount(truth, minlength=k), predicted=np.bincount(index, minlength=k),
                      right=np.bincount(truth[index == truth], minlength=k))
    else:
        t = y.to_numpy(np.float64)
        totals.update(sse=float(((pred - t) ** 2).sum()), s1=float(t.sum()), s2=float((t * t).sum()))
    return totals


def metrics(parts: list[dict[str, Any]], meta: dict[str, Any]) -> dict[str, Any]:
    """The metrics from the partitions' totals (every partition's or none: the label is in all or none)."""
    n = sum(p["rows"] for p in parts)
    out: dict[str, Any] = {"rows": n}
    if not n or ("correct" not in parts[0] and "sse" not in parts[0]):
        return out
    if meta["classes"]:
        true, pred, right = (sum(p[k] for p in parts) for k in ("true", "predicted", "right"))
        out.update(accuracy=sum(p["correct"] for p in parts) / n, log_loss=sum(p["log_loss"] for p in parts) / n,
                   per_class={str(c): {"rows": int(t), "predicted": int(q), "correct": int(r)}
                              for c, t, q, r in zip(meta["classes"], true, pred, right, strict=True)})
    else:
        sse, s1, s2 = (sum(p[k] for p in parts) for k in ("sse", "s1", "s2"))
        ss_tot = s2 - s1 * s1 / n
        out.update(mse=sse / n, r2=1 - sse / ss_tot if ss_tot > 0 else float("nan"))
    return out


def check_columns(columns: dict[str, Any], meta: dict[str, Any], label: str) -> bool:
    """Refuse data the model cannot score, naming the column; True when the label column is there."""
    features = meta["features"]
    listed = ", ".join(features)
    missing = [f for f in features if f not in columns]
    if missing:
        raise UserError(f"--data: no column {missing[0]!r}, which the model was trained on (it uses {listed}); "
                        "pass data with the training columns")
    extra = [c for c in columns if c not in (*features, label, data.ROW_ID)]
    if extra:
        raise UserError(f"--data: column {extra[0]!r} was not in the training data (the model uses {listed}, "
                        f"label {label!r}); drop it from the data")
    for f in features:
        if not pd.api.types.is_numeric_dtype(columns[f]) and not pd.api.types.is_bool_dtype(columns[f]):
            raise UserError(f"--data: column {f!r} is {columns[f]}, not numbers as in training; "
                            "encode it as numbers")
    if data.ROW_ID in columns and not pd.api.types.is_integer_dtype(columns[data.ROW_ID]):
        raise UserError(f"--data: column {data.ROW_ID!r} must hold integer row ids, got {columns[data.ROW_ID]}; "
                        "rename or drop it")
    return label in columns


def predict(run_path: str, data_cfg: DataConfig, out: str, cluster: ClusterConfig | None = None) -> dict[str, Any]:
    """Score ``data_cfg.data`` with the model of ``run_path``; Parquet files under ``out``; the metrics."""
    staging = _staging(out)  # before any work: a place that cannot be written is one line now
    try:
        result = _predict(run_path, data_cfg, staging, cluster or ClusterConfig())
        _publish(staging, out, json.dumps(result, indent=1))
    except BaseException:
        _remove(staging)  # this call's own: nothing partial is left
        raise
    return result


def _predict(run_path: str, data_cfg: DataConfig, staging: str, cluster: ClusterConfig) -> dict[str, Any]:
    from dtrain.cluster import connect

    kind, payload, meta = _payload(run_path)
    # The schema is known from the files' metadata (or a sample of a CSV): bad data is refused before
    # any cluster starts.
    source = sources.list_source(data_cfg)  # --data listed once, read by training's own readers
    ddf = sources.frame(source, data_cfg, 0)
    label = sources.ARRAY_LABEL if source.format in ("npy", "zarr") else data_cfg.label
    has_label = check_columns({str(c): t for c, t in ddf.dtypes.items()}, meta, label)
    ddf = ddf[[c for c in ddf.columns if c in (data.ROW_ID, *meta["features"], label)]]
    with connect(cluster) as client:
        parts = dataset.own_graphs(list(ddf.to_delayed()))
        offsets: list[int | None] = [None] * len(parts)
        if data.ROW_ID not in ddf.columns:  # rows numbered by position, as training numbers them
            with sources.read_errors(sources.data_where(data_cfg)):
                lengths = ddf.map_partitions(len).compute().tolist()
            offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(int).tolist()
        digest = hashlib.sha256(payload if kind == "pt2" else run_path.encode()).hexdigest()
        [model] = client.scatter([(digest, kind, payload)], broadcast=True, hash=False)
        tasks = [dask.delayed(predict_part, pure=False)(PartGraph.of(p), model, meta,
                                                        label if has_label else None, o,
                                                        f"{staging}/part-{i:05d}.parquet")
                 for i, (p, o) in enumerate(zip(parts, offsets, strict=True))]
        with sources.read_errors(sources.data_where(data_cfg)):
            totals = list(dask.compute(*tasks))
    errors = [t["error"] for t in totals if "error" in t]
    if errors:
        raise UserError(errors[0])
    return metrics(totals, meta)


def _staging(out: str) -> str:
    """Check that ``out`` (a local path or an fsspec URL) is new and writable, before any work; return the
    URL of a fresh staging directory beside it, which the workers write into.

    The output appears at ``out`` whole or not at all: ``_publish`` renames the staging directory there
    once every part and the metrics are written, so an interrupted run leaves no ``out`` to be mistaken for
    a complete one (only ``out.tmp-*``, which a rerun does not read).
    """
    fs, root = fsspec.core.url_to_fs(out)
    root = root.rstrip("/")
    if fs.exists(root) and (not fs.isdir(root) or fs.ls(root)):
        raise UserError(f"--out: {out!r} already exists; choose a new directory (nothing is overwritten)")
    staging = f"{root}.tmp-{uuid.uuid4().hex[:8]}"
    storage.probe(fs.unstrip_protocol(staging), "--out", out)  # creates it, or one line: read-only, no bucket...
    return fs.unstrip_protocol(staging)


def _publish(staging: str, out: str, metrics_json: str) -> None:
    """Write the metrics into ``staging``, then move it to ``out`` in one rename (local and file:// URLs;
    an object store copies, and ``out`` appears once the copy is done)."""
    fs, root = fsspec.core.url_to_fs(out)
    root = root.rstrip("/")
    _, tmp = fsspec.core.url_to_fs(staging)
    with fs.open(f"{tmp}/_metrics.json", "w") as f:
        f.write(metrics_json)
    if fs.exists(root):  # the empty directory the user named: a rename replaces it only when absent
        fs.rmdir(root)
    fs.mv(tmp, root, recursive=True)


def _remove(url: str) -> None:
    fs, path = fsspec.core.url_to_fs(url)
    with contextlib.suppress(Exception):
        fs.rm(path, recursive=True)


def build_parser() -> argparse.ArgumentParser:
    from dtrain.cli import _Parser

    p = _Parser(prog="python -m dtrain.predict",
                description="Predict with a trained run's model over the Dask cluster; Parquet out, metrics "
                            "when the data has the label column.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a finished run's directory, or one of its checkpoints")
    p.add_argument("--data", required=True, help="the rows to score, in any format dtrain trains on")
    p.add_argument("--out", required=True, help="new directory (a path or an fsspec URL) for part-*.parquet and "
                   "_metrics.json; it appears once complete")
    p.add_argument("--format", default="auto", help="format of --data (default: guessed from the names)")
    p.add_argument("--label", default=None, help="label column (default: the training run's; npy: the labels "
                   "file, required)")
    p.add_argument("--scheduler", default=None, help="Dask scheduler address (default: an embedded cluster)")
    p.add_argument("--dask-workers", type=int, default=0, help="workers of the embedded cluster (0: sized to "
                   "the machine)")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    from dtrain.cli import _fail

    logging.basicConfig(level=os.environ.get("DTRAIN_LOG_LEVEL", "WARNING"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    args = build_parser().parse_args(argv)
    try:
        from dtrain import portable

        label = args.label
        if label is None:
            label = portable.load_module(args.run_dir)[1]["label"]
        result = predict(args.run_dir, DataConfig(data=args.data, format=args.format, label=label), args.out,
                         ClusterConfig(scheduler=args.scheduler, dask_workers=args.dask_workers))
    except UserError as e:
        _fail(str(e))
    print(json.dumps(result))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
