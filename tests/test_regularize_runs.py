"""--l1 in real runs: exact zeros on the features that do not matter, the same weights on 1 and 2 ranks
(the whole step in one process, the sharded step on two), and --l1's refusal under Adam."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(420)]

FEATURES, RELEVANT = 20, 3


def sparse_dataset(path: Path, rows: int = 4000) -> Path:
    """Labels decided by the first 3 of 20 features; the other 17 are noise."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(rows, FEATURES)).astype(np.float32)
    df = pd.DataFrame(x, columns=[f"x{i:02d}" for i in range(FEATURES)])
    df["y"] = (x[:, :RELEVANT].sum(axis=1) > 0).astype(np.int64)
    path.mkdir()
    for i, start in enumerate(range(0, rows, rows // 4)):
        df.iloc[start : start + rows // 4].to_parquet(path / f"part-{i}.parquet")
    return path


L1 = ["--label", "y", "--model", "logistic", "--optimizer", "sgd", "--momentum", "0", "--lr", "0.1",
      "--l1", "0.05", "--global-batch-size", "200", "--epochs", "4"]


def test_l1_exact_zeros_and_same_weights_on_one_and_two_ranks(dtrain_local, horovodrun, tmp_path):
    data = sparse_dataset(tmp_path / "sparse")
    one = dtrain_local([*L1, "--data", str(data)], run_dir=tmp_path / "np1").check()
    two = horovodrun([*L1, "--data", str(data)], np=2, run_dir=tmp_path / "np2").check()
    w1 = torch.load(tmp_path / "np1" / "model.pt", map_location="cpu")["weight"]
    w2 = torch.load(tmp_path / "np2" / "model.pt", map_location="cpu")["weight"]
    assert (w1[:, RELEVANT:] == 0).all(), w1
    assert (w1[:, :RELEVANT] != 0).all(), w1
    assert torch.equal(w1 == 0, w2 == 0)
    # The same update on every rank; the sharded step's fused kernel may round an element's last bit.
    torch.testing.assert_close(w2, w1, rtol=1e-5, atol=1e-6)
    expected = (FEATURES - RELEVANT) * 2 / (FEATURES * 2)
    assert one.summary()["zero_weights"] == pytest.approx(expected)
    assert two.summary()["zero_weights"] == pytest.approx(expected)
    assert one.summary()["eval_accuracy"] > 0.95
    assert two.summary()["sharded_step"] is True  # the L1 step ran on each rank's shard


def test_l1_with_adam_is_refused_in_one_line(dtrain_local, tmp_path):
    res = dtrain_local(["--optimizer", "adam", "--l1", "0.1"])
    assert res.returncode == 2
    lines = [line for line in res.output.splitlines() if "error" in line]
    assert lines == [lines[0]] and lines[0].startswith("dtrain: error: --l1: "), res.output



def test_exponential_schedule_per_epoch_in_a_run(dtrain_local, tmp_path):
    """Each step's rate is --lr * --lr-decay ** (rows trained before the step / training rows)."""
    data = sparse_dataset(tmp_path / "sparse")
    res = dtrain_local(["--data", str(data), "--label", "y", "--model", "logistic", "--lr", "0.1",
                        "--schedule", "exponential", "--lr-decay", "0.5", "--global-batch-size", "300",
                        "--epochs", "3", "--log-every", "1"], run_dir=tmp_path / "exp").check()
    assert res.run_dir is not None
    train_rows = sum(json.loads((res.run_dir / "stats.json").read_text())["train_sizes"])
    steps = [m for m in res.metrics() if "lr" in m]
    before = 0
    for m in steps:
        assert m["lr"] == pytest.approx(0.1 * 0.5 ** (before / train_rows), rel=1e-9)
        before = m["samples"]
    assert before == 3 * train_rows and steps[-1]["lr"] < 0.1 * 0.5**2


EARLY = ["--gen-rows", "1000", "--gen-partitions", "4", "--gen-noise", "6", "--gen-features", "16",
         "--hidden", "256,256", "--optimizer", "adam", "--lr", "0.01", "--global-batch-size", "32",
         "--epochs", "30", "--early-stop", "2", "--val-fraction", "0.3"]


def test_early_stop_keeps_the_best_model_across_a_resume(dtrain_local, tmp_path):
    """Noisy data a wide MLP overfits: the held-out loss rises, training stops with the best evaluated
    model in model.pt (the last in model-last.pt); stopped before and resumed, the same."""
    from dtrain.checkpoint import model_sha256

    whole = dtrain_local(EARLY, run_dir=tmp_path / "whole").check()
    s = whole.summary()
    assert s["stop_reason"] == "early_stop" and s["monitor"] == "eval_loss"
    evals = [m for m in whole.metrics() if "eval_loss" in m]
    assert len(evals) < 30 and s["best_step"] < s["steps"]
    assert min(evals, key=lambda m: m["eval_loss"])["step"] == s["best_step"]
    assert min(m["eval_loss"] for m in evals) == s["best_value"]
    best = torch.load(tmp_path / "whole" / "model.pt")
    last = torch.load(tmp_path / "whole" / "model-last.pt")
    assert model_sha256(last) == s["model_sha256"] != model_sha256(best)

    # Interrupted after the first improvement's evaluation, then resumed with the same flags.
    first = dtrain_local([*EARLY, "--max-steps", str(s["best_step"] + 1)], run_dir=tmp_path / "split").check()
    assert first.summary()["stop_reason"] == "max_steps"
    resumed = dtrain_local(EARLY, run_dir=tmp_path / "split").check().summary()
    assert {k: resumed[k] for k in ("stop_reason", "steps", "best_step", "best_value", "model_sha256")} == \
        {k: s[k] for k in ("stop_reason", "steps", "best_step", "best_value", "model_sha256")}
    assert model_sha256(torch.load(tmp_path / "split" / "model.pt")) == model_sha256(best)
    # Run again once stopped: it stays stopped.
    again = dtrain_local(EARLY, run_dir=tmp_path / "split").check().summary()
    assert again["stop_reason"] == "early_stop" and again["steps"] == s["steps"]


def test_early_stop_on_two_ranks_stops_where_one_process_does(dtrain_local, horovodrun, tmp_path):
    """The early-stop decision and the best model do not depend on the world size."""
    one = dtrain_local(EARLY, run_dir=tmp_path / "one").check().summary()
    two = horovodrun(EARLY, np=2, run_dir=tmp_path / "two").check().summary()
    assert two["stop_reason"] == one["stop_reason"] == "early_stop"
    assert (two["steps"], two["best_step"]) == (one["steps"], one["best_step"])
    assert two["best_value"] == pytest.approx(one["best_value"], rel=1e-4)
    a, b = torch.load(tmp_path / "one" / "model.pt"), torch.load(tmp_path / "two" / "model.pt")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-3  # adam, a few hundred steps: reduction order


def test_lr_find_prints_a_suggestion_and_writes_the_plot(dtrain_local, tmp_path):
    res = dtrain_local(["--gen-rows", "8000", "--optimizer", "sgd", "--momentum", "0", "--num-steps", "60",
                        "--end-lr", "0.5"], run_dir=tmp_path / "lr", module="dtrain.lr_find").check()
    line = [x for x in res.stdout.splitlines() if x.startswith("suggested learning rate: ")]
    assert len(line) == 1, res.output
    found = json.loads((tmp_path / "lr" / "lr_find.json").read_text())
    assert 1e-6 < found["suggested_lr"] < 0.5 and len(found["lrs"]) == 60  # no divergence below 0.5
    assert found["lrs"][0] == pytest.approx(1e-6) and found["lrs"][-1] == pytest.approx(0.5)
    assert (tmp_path / "lr" / "lr_find.png").stat().st_size > 0
    bad = dtrain_local(["--start-lr", "1", "--end-lr", "0.1"], run_dir=tmp_path / "bad", module="dtrain.lr_find")
    assert bad.returncode == 2 and bad.stderr.strip().startswith("dtrain: error: --start-lr/--end-lr: ")


# A script horovodrun starts: under ``__main__`` only, as Dask's worker processes re-import the main module.
LR_FIND = "import runpy\nif __name__ == '__main__':\n    runpy.run_module('dtrain.lr_find', run_name='__main__')\n"


def test_lr_find_stops_every_rank_where_the_loss_diverges(horovodrun, tmp_path):
    """A range up to an LR of 1000 diverges: both ranks stop at the same step, long before the end."""
    script = tmp_path / "lr_find.py"
    script.write_text(LR_FIND)
    run = tmp_path / "lr"
    res = horovodrun(["--gen-rows", "8000", "--optimizer", "sgd", "--momentum", "0",
                      "--num-steps", "80", "--end-lr", "1000", "--run-dir", str(run)], script=str(script)).check()
    [line] = [x for x in res.stdout.splitlines() if "the loss diverged at " in x]  # rank 0's, once
    found = json.loads((run / "lr_find.json").read_text())
    steps = len(found["lrs"])
    assert steps < 80 and line.endswith(f"stopped after {steps} of 80 steps"), res.output
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stop_reason"] == "diverged" and summary["steps"] == steps and summary["ranks_identical"]
    assert found["lrs"][-1] < 1000 and found["suggested_lr"] < found["lrs"][-1]

