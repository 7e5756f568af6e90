"""Using what was trained: the portable model.pt2, dtrain.load, and python -m dtrain.predict over the cluster."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

import dtrain
from dtrain.data import is_validation

REPO = Path(__file__).resolve().parent.parent
FEATURES = [f"f{j}" for j in range(6)]


def _rows(n: int, start: int, seed: int) -> pd.DataFrame:
    """Three classes around fixed centres, features on different scales (standardisation matters)."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).normal(0, 2, size=(3, len(FEATURES)))
    y = rng.integers(0, 3, size=n)
    x = (centres[y] + rng.normal(0, 1.5, size=(n, len(FEATURES)))) * np.arange(1, len(FEATURES) + 1) * 10
    df = pd.DataFrame(x.astype(np.float32), columns=FEATURES)
    df.insert(0, "row_id", np.arange(start, start + n, dtype=np.int64))
    df["label"] = np.array([7, 11, 13])[y]  # labels that are not class indexes
    return df


def _run(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A run trained on 4 Parquet files (one process, embedded cluster)."""
    root = tmp_path_factory.mktemp("predict")
    data = root / "data"
    data.mkdir()
    frames = [_rows(400, 400 * i, i) for i in range(4)]
    for i, f in enumerate(frames):
        f.to_parquet(data / f"part-{i}.parquet", index=False)
    run = root / "run"
    p = _run(["-m", "dtrain", "--data", str(data), "--run-dir", str(run), "--epochs", "2", "--hidden", "16",
              "--global-batch-size", "64", "--dask-workers", "1", "--val-fraction", "0.2"])
    assert p.returncode == 0, p.stderr[-4000:]
    return {"root": root, "data": data, "run": run, "frame": pd.concat(frames, ignore_index=True),
            "summary": json.loads((run / "summary.json").read_text())}


PLAIN_TORCH = """
import json, sys
sys.modules["dtrain"] = None  # plain torch: importing dtrain must fail here
import numpy as np, torch
extra = {"dtrain.json": ""}
program = torch.export.load(sys.argv[1], extra_files=extra)
x = torch.from_numpy(np.load(sys.argv[2]))
with torch.no_grad():
    pred, proba = program.module()(x)
np.save(sys.argv[3], pred.numpy())
print(extra["dtrain.json"])
"""


@pytest.mark.cluster
def test_artifact_predicts_as_dtrain_evaluated(trained: dict[str, Any], tmp_path: Path) -> None:
    """model.pt2 with plain torch (no dtrain) on raw rows: the labels themselves, and on the held-out
    rows exactly the accuracy dtrain's own evaluation reported."""
    df = trained["frame"]
    np.save(tmp_path / "x.npy", df[FEATURES].to_numpy(np.float32))
    p = _run(["-c", PLAIN_TORCH, str(trained["run"] / "model.pt2"), str(tmp_path / "x.npy"),
              str(tmp_path / "pred.npy")])
    assert p.returncode == 0, p.stderr[-3000:]
    meta = json.loads(p.stdout)
    assert meta["features"] == FEATURES and meta["classes"] == [7, 11, 13]
    pred = np.load(tmp_path / "pred.npy")
    assert set(np.unique(pred)) <= {7, 11, 13}
    val = is_validation(df["row_id"].to_numpy(), 0.2, 0)
    accuracy = float((pred[val] == df["label"].to_numpy()[val]).mean())
    assert accuracy == pytest.approx(trained["summary"]["eval_accuracy"], abs=1e-9)

    model = dtrain.load(str(trained["run"]))
    np.testing.assert_array_equal(model.predict(df), pred)  # a DataFrame: columns by name, any order
    np.testing.assert_array_equal(model.predict(df[[*FEATURES[::-1], "label"]]), pred)
    proba = model.predict_proba(df[FEATURES].to_numpy())
    assert proba.shape == (len(df), 3)
    np.testing.assert_allclose(proba.sum(axis=1), 1, rtol=1e-5)
    # A checkpoint is a model too: the same predictions, rebuilt from model weights, config and stats.
    [step] = sorted((trained["run"] / "checkpoints").glob("step-*"))
    np.testing.assert_array_equal(dtrain.load(str(step)).predict(df), pred)


@pytest.mark.cluster
def test_predict_over_two_workers_equals_one_process(trained: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "out"
    p = _run(["-m", "dtrain.predict", str(trained["run"]), "--data", str(trained["data"]), "--out", str(out),
              "--dask-workers", "2"])
    assert p.returncode == 0, p.stderr[-3000:]
    printed = json.loads(p.stdout.strip().splitlines()[-1])
    assert printed == json.loads((out / "_metrics.json").read_text())
    scored = pd.read_parquet(out).sort_values("row_id").reset_index(drop=True)
    assert len(list(out.glob("part-*.parquet"))) == 4
    df = trained["frame"]
    model = dtrain.load(str(trained["run"]))
    np.testing.assert_array_equal(scored["row_id"], df["row_id"])
    np.testing.assert_array_equal(scored["prediction"], model.predict(df))
    np.testing.assert_allclose(scored[["proba_7", "proba_11", "proba_13"]], model.predict_proba(df), rtol=1e-6)
    assert printed["rows"] == len(df)
    assert printed["accuracy"] == pytest.approx(float((model.predict(df) == df["label"]).mean()))
    assert sum(c["rows"] for c in printed["per_class"].values()) == len(df)
    p_true = model.predict_proba(df)[np.arange(len(df)), pd.Index([7, 11, 13]).get_indexer(df["label"])]
    assert printed["log_loss"] == pytest.approx(float(-np.log(p_true).mean()), rel=1e-5)


@pytest.mark.parametrize("change, expected", [
    (lambda df: df.drop(columns=["f2"]), "--data: no column 'f2', which the model was trained on"),
    (lambda df: df.assign(extra=1.0), "--data: column 'extra' was not in the training data"),
    (lambda df: df.assign(f1=df["f1"].astype(str) + "x"), "--data: column 'f1' is string, not numbers"),
    (lambda df: df.rename(columns={f: f"g{f}" for f in FEATURES}), "--data: no column 'f0'"),
], ids=["missing-column", "extra-column", "wrong-dtype", "other-model's-data"])
@pytest.mark.cluster
def test_bad_data_gets_one_line(trained: dict[str, Any], tmp_path: Path, change: Any, expected: str) -> None:
    change(trained["frame"].head(50)).to_csv(tmp_path / "bad.csv", index=False)
    p = _run(["-m", "dtrain.predict", str(trained["run"]), "--data", str(tmp_path / "bad.csv"),
              "--out", str(tmp_path / "out")])
    assert p.returncode == 2, p.stderr[-3000:]
    [line] = p.stderr.strip().splitlines()
    assert line.startswith(f"dtrain: error: {expected}"), line
    assert not (tmp_path / "out").exists()


@pytest.mark.cluster
def test_unknown_class_and_no_model_get_one_line(trained: dict[str, Any], tmp_path: Path) -> None:
    trained["frame"].head(50).assign(label=5).to_csv(tmp_path / "c.csv", index=False)
    # A checkpoint as the model (no model.pt2: the workers get the model rebuilt from its weights).
    [step] = sorted((trained["run"] / "checkpoints").glob("step-*"))
    p = _run(["-m", "dtrain.predict", str(step), "--data", str(tmp_path / "c.csv"),
              "--out", str(tmp_path / "out"), "--dask-workers", "1"])
    assert p.returncode == 2, p.stderr[-3000:]
    [line] = p.stderr.strip().splitlines()
    assert line.startswith("dtrain: error: --label: value 5 is not one of the model's 3 classes"), line
    assert not (tmp_path / "out").exists()  # no partial output left behind
    p = _run(["-m", "dtrain.predict", str(trained["root"]), "--data", str(tmp_path / "c.csv"),
              "--out", str(tmp_path / "out2")])
    assert p.returncode == 2
    assert p.stderr.strip().startswith("dtrain: error: RUN_DIR: ") and "has no config.yaml" in p.stderr


@pytest.mark.distributed
def test_digits_two_ranks_reach_sklearn_mlp(horovodrun: Any, tmp_path: Path) -> None:
    """scikit-learn's digits, its official-style split: trained with 2 ranks, scored by dtrain.predict on
    the test split, as accurate as MLPClassifier on the same split (within one point)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.neural_network import MLPClassifier

    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    reference = MLPClassifier(random_state=0, max_iter=500).fit(x_train, y_train).score(x_test, y_test)
    columns = [f"pixel{j}" for j in range(x.shape[1])]
    for name, xs, ys in (("train", x_train, y_train), ("test", x_test, y_test)):
        pd.DataFrame(xs, columns=columns).assign(digit=ys).to_csv(tmp_path / f"{name}.csv", index=False)
    run = tmp_path / "run"
    # The test split is also --eval-data: the 2 ranks' evaluation of it must agree with dtrain.predict's.
    horovodrun(["--data", str(tmp_path / "train.csv"), "--label", "digit", "--eval-data", str(tmp_path / "test.csv"),
                "--epochs", "30", "--global-batch-size", "64", "--dask-workers", "1"], np=2, run_dir=run).check()
    p = _run(["-m", "dtrain.predict", str(run), "--data", str(tmp_path / "test.csv"), "--out", str(tmp_path / "out"),
              "--dask-workers", "1"])
    assert p.returncode == 0, p.stderr[-3000:]
    scored = json.loads(p.stdout.strip().splitlines()[-1])
    assert scored["rows"] == len(y_test)
    assert scored["accuracy"] >= reference - 0.01, (scored["accuracy"], reference)
    assert json.loads((run / "summary.json").read_text())["eval_accuracy"] == pytest.approx(scored["accuracy"])


def _write_as(df: pd.DataFrame, fmt: str, where: Path) -> tuple[Path, list[str]]:
    """``df`` saved in ``fmt`` under ``where``; the path and the label flags that read it back."""
    x, y = df[FEATURES].to_numpy(np.float32), df["label"].to_numpy(np.int64)
    if fmt == "parquet":
        df.to_parquet(where / "test.parquet", index=False)
        return where / "test.parquet", []
    if fmt == "csv":
        df.to_csv(where / "test.csv", index=False)
        return where / "test.csv", []
    if fmt == "npy":
        np.save(where / "x_test.npy", x)
        np.save(where / "y_test.npy", y)
        return where / "x_test.npy", [str(where / "y_test.npy")]
    zarr = pytest.importorskip("zarr")
    group = zarr.open_group(str(where / "test.zarr"), mode="w")
    group.create_array("x", data=x)
    group.create_array("y", data=y)
    return where / "test.zarr", []


@pytest.mark.parametrize("fmt", ["parquet", "csv", "npy", "zarr"])
@pytest.mark.cluster
def test_eval_data_and_predict_read_every_format(trained: dict[str, Any], tmp_path: Path, fmt: str) -> None:
    """--eval-data is evaluated every epoch with the training statistics, and dtrain.predict scores the same
    rows alike, whatever the format the evaluation set comes in (a file:// URL for --out)."""
    held_out = _rows(300, 10_000, 42)
    path, labels = _write_as(held_out, fmt, tmp_path)
    run = tmp_path / "run"
    p = _run(["-m", "dtrain", "--data", str(trained["data"]), "--eval-data", str(path),
              *(["--eval-label", labels[0]] if labels else []),
              "--run-dir", str(run), "--epochs", "2", "--hidden", "16", "--global-batch-size", "64",
              "--dask-workers", "1"])
    assert p.returncode == 0, p.stderr[-4000:]
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "eval_rows" in line]
    assert [e["epoch"] for e in evals] == [0, 1] and all(e["eval_rows"] == 300 for e in evals)
    stats = json.loads((run / "stats.json").read_text())
    assert sum(stats["train_sizes"]) == len(trained["frame"]) and sum(stats["val_sizes"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    model = dtrain.load(str(run))
    accuracy = float((model.predict(held_out) == held_out["label"]).mean())
    assert summary["eval_accuracy"] == pytest.approx(accuracy, abs=1e-9)

    out = f"file://{tmp_path}/scored"
    p = _run(["-m", "dtrain.predict", str(run), "--data", str(path), *(["--label", labels[0]] if labels else []),
              "--out", out, "--dask-workers", "1"])
    assert p.returncode == 0, p.stderr[-3000:]
    printed = json.loads(p.stdout.strip().splitlines()[-1])
    assert printed["rows"] == 300 and printed["accuracy"] == pytest.approx(accuracy, abs=1e-9)
    scored = pd.read_parquet(tmp_path / "scored").sort_values("row_id")
    np.testing.assert_array_equal(scored["prediction"], model.predict(held_out))
    assert sorted(p.name for p in tmp_path.iterdir() if ".tmp-" in p.name) == []  # the staging directory moved


@pytest.mark.cluster
def test_npy_eval_data_without_its_labels_is_one_line(trained: dict[str, Any], tmp_path: Path) -> None:
    path, _ = _write_as(_rows(50, 0, 1), "npy", tmp_path)
    p = _run(["-m", "dtrain", "--data", str(path), "--label", str(tmp_path / "y_test.npy"), "--eval-data", str(path),
              "--run-dir", str(tmp_path / "run"), "--epochs", "1", "--dask-workers", "1"])
    assert p.returncode == 2, p.stderr[-3000:]
    assert p.stderr.strip().splitlines()[-1].startswith("dtrain: error: --eval-label: with .npy evaluation data, "
                                                        "name its labels file")


@pytest.mark.cluster
def test_read_only_out_is_one_line_before_any_work(trained: dict[str, Any], tmp_path: Path, mount_tmpfs: Any) -> None:
    ro = mount_tmpfs(tmp_path / "ro", ro=True)
    p = _run(["-m", "dtrain.predict", str(trained["run"]), "--data", str(trained["data"]), "--out", str(ro / "out")])
    assert p.returncode == 2, p.stderr[-3000:]
    [line] = p.stderr.strip().splitlines()
    assert line.startswith(f"dtrain: error: --out: cannot write to {str(ro / 'out')!r} (Read-only file system)"), line


@pytest.mark.cluster
def test_eval_data_with_other_columns_gets_one_line(trained: dict[str, Any], tmp_path: Path) -> None:
    _rows(50, 0, 1).drop(columns=["f3"]).to_csv(tmp_path / "test.csv", index=False)
    p = _run(["-m", "dtrain", "--data", str(trained["data"]), "--eval-data", str(tmp_path / "test.csv"),
              "--run-dir", str(tmp_path / "run"), "--epochs", "1", "--dask-workers", "1"])
    assert p.returncode == 2, p.stderr[-3000:]
    assert p.stderr.strip().splitlines()[-1].startswith("dtrain: error: --eval-data: --features: no column 'f3'")


FIT = """
import json, sys
import pandas as pd
import dtrain
fitted = dtrain.fit(sys.argv[1], run_dir=sys.argv[2], epochs=2, hidden=[16], global_batch_size=64, dask_workers=1)
df = pd.read_parquet(sys.argv[1])
print(json.dumps({"summary": fitted.summary, "accuracy": float((fitted.predict(df) == df["label"]).mean()),
                  "run_dir": fitted.run_dir}))
try:
    dtrain.fit(sys.argv[1], epoch=2)
except dtrain.config.UserError as e:
    print(e)
"""


@pytest.mark.cluster
def test_fit_returns_the_summary_and_a_model_that_predicts(trained: dict[str, Any], tmp_path: Path) -> None:
    p = _run(["-c", FIT, str(trained["data"]), str(tmp_path / "run")])
    assert p.returncode == 0, p.stderr[-4000:]
    result, error = p.stdout.strip().splitlines()[-2:]
    fitted = json.loads(result)
    assert fitted["summary"] == json.loads((tmp_path / "run" / "summary.json").read_text())
    assert fitted["summary"]["epochs"] == 2 and fitted["run_dir"] == str(tmp_path / "run")
    assert fitted["accuracy"] > 0.5  # three classes: a trained model, not chance
    assert error.startswith("dtrain.fit: no setting 'epoch'")


@pytest.mark.cluster
def test_regression_predicts_values_and_scores_r2(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    x = rng.normal(0, 3, size=(1200, 4)).astype(np.float32)
    df = pd.DataFrame(x, columns=["a", "b", "c", "d"]).assign(target=(x @ [1.0, -2.0, 0.5, 0] + 10).astype(np.float32))
    df.to_parquet(tmp_path / "data.parquet", index=False)
    run = tmp_path / "run"
    p = _run(["-m", "dtrain", "--data", str(tmp_path / "data.parquet"), "--label", "target", "--run-dir", str(run),
              "--epochs", "3", "--hidden", "16", "--global-batch-size", "32", "--lr", "0.01", "--dask-workers", "1"])
    assert p.returncode == 0, p.stderr[-4000:]
    model = dtrain.load(str(run))
    assert model.task == "regression"
    pred = model.predict(df)
    val = is_validation(np.arange(len(df)), 0.1, 0)  # no row_id column: rows are numbered by position
    t = df["target"].to_numpy(np.float64)[val]
    r2 = 1 - ((pred[val] - t) ** 2).sum() / ((t - t.mean()) ** 2).sum()
    assert json.loads((run / "summary.json").read_text())["eval_r2"] == pytest.approx(r2, rel=1e-4)
    p = _run(["-m", "dtrain.predict", str(run), "--data", str(tmp_path / "data.parquet"), "--out",
              str(tmp_path / "out"), "--dask-workers", "1"])
    assert p.returncode == 0, p.stderr[-3000:]
    scored = json.loads(p.stdout.strip().splitlines()[-1])
    assert scored["mse"] == pytest.approx(float(((pred - df["target"]) ** 2).mean()), rel=1e-5)
    assert scored["r2"] > 0.9
    out = pd.read_parquet(tmp_path / "out")
    assert list(out.columns) == ["row_id", "prediction"]
    np.testing.assert_allclose(out.sort_values("row_id")["prediction"], pred, rtol=1e-6)
