"""Training modes end to end: online learning, local SGD, and a reference from scikit-learn."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(420)]


def linear_dataset(path: Path, rows: int = 6000, features: int = 10, seed: int = 0) -> Path:
    """Rows labelled by a hyperplane: a linear model can reach ~100%."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, features)).astype(np.float32)
    w = rng.normal(size=features)
    df = pd.DataFrame(x, columns=[f"x{i}" for i in range(features)])
    df["y"] = (x @ w > 0).astype(np.int64)
    path.mkdir()
    for i, start in enumerate(range(0, rows, rows // 4)):
        df.iloc[start : start + rows // 4].to_parquet(path / f"part-{i}.parquet")
    return path


ONLINE = ["--mode", "online", "--label", "y", "--model", "logistic", "--optimizer", "sgd", "--momentum", "0",
          "--lr", "0.5", "--global-batch-size", "8", "--val-fraction", "0.1"]


def test_online_progressive_accuracy_and_local_sgd(horovodrun, tmp_path):
    data = linear_dataset(tmp_path / "linear")
    every = horovodrun([*ONLINE, "--data", str(data)], run_dir=tmp_path / "sync1").check().summary()
    local = horovodrun([*ONLINE, "--data", str(data), "--sync-every", "8"], run_dir=tmp_path / "sync8")
    local = local.check().summary()
    assert every["mode"] == "online" and every["epochs"] == 1
    assert every["progressive_accuracy"] >= 0.95
    assert abs(local["progressive_accuracy"] - every["progressive_accuracy"]) <= 0.01
    # 8x fewer model-combining collectives (the last step always syncs).
    assert every["syncs"] == every["steps"]
    assert local["syncs"] == -(-local["steps"] // 8)
    assert local["ranks_identical"] and every["ranks_identical"]


def test_mlp_matches_scikit_learn_on_default_data(horovodrun, tmp_path):
    """The default MLP reaches, within 1 point, scikit-learn's MLPClassifier on the same split."""
    from sklearn.neural_network import MLPClassifier

    from dtrain.config import DataConfig
    from dtrain.data.prepare import Spec, is_validation
    from dtrain.data.sources import _generate_partition

    cfg = DataConfig(gen_rows=20000, gen_partitions=8)
    res = horovodrun(["--gen-rows", "20000", "--gen-partitions", "8", "--epochs", "10"]).check()
    ours = res.summary()["eval_accuracy"]

    sizes = [cfg.gen_rows // 8] * 8
    df = pd.concat([_generate_partition(i, n, i * n, cfg.gen_features, cfg.gen_classes, cfg.gen_noise, 0)
                    for i, n in enumerate(sizes)])
    val = is_validation(df["row_id"].to_numpy(), cfg.val_fraction, Spec((), "label", 0, 0, None).seed)
    x = df.filter(like="f").to_numpy()
    mean, std = x[~val].mean(0), x[~val].std(0)
    x = (x - mean) / std
    y = df["label"].to_numpy()
    sk = MLPClassifier(hidden_layer_sizes=(128, 128), batch_size=256, learning_rate_init=1e-3, max_iter=10,
                       random_state=0).fit(x[~val], y[~val])
    theirs = sk.score(x[val], y[val])
    assert ours >= theirs - 0.01, (ours, theirs)


def test_amp_trains_in_bfloat16_autocast_to_float32_accuracy(horovodrun, tmp_path):
    """--amp (bfloat16 autocast, here on CPU as it would be on GPU): the ranks stay identical and the
    model learns as well as in float32, while its predictions do differ from float32's."""
    args = ["--gen-rows", "8000", "--gen-partitions", "4", "--epochs", "3"]
    full = horovodrun(args, run_dir=tmp_path / "fp32").check().summary()
    amp = horovodrun([*args, "--amp"], run_dir=tmp_path / "amp").check().summary()
    assert amp["ranks_identical"]
    assert amp["model_sha256"] != full["model_sha256"]  # the forward pass really ran in bfloat16
    assert amp["eval_accuracy"] >= full["eval_accuracy"] - 0.02, (amp["eval_accuracy"], full["eval_accuracy"])
