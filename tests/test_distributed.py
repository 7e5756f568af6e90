"""Real multi-process runs: horovodrun -np 2 over Gloo, with the embedded Dask cluster."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from dtrain.checkpoint import Checkpointer

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(420)]

# Small data whose training split is not a multiple of the global batch: the last batch is partial.
SMALL = ["--gen-rows", "5000", "--gen-partitions", "7", "--gen-features", "16", "--global-batch-size", "96",
         "--hidden", "32,32", "--log-every", "5"]


def load_params(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "model.pt", map_location="cpu")


def max_rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-12)) for k in a)


def test_two_ranks_write_complete_run_dir(horovodrun):
    res = horovodrun(["--max-steps", "50"]).check()
    run = res.run_dir
    assert run is not None
    for name in ("config.yaml", "metrics.jsonl", "model.pt", "summary.json", "stats.json"):
        assert (run / name).is_file(), name
    summary = res.summary()
    assert summary["world_size"] == 2 and summary["steps"] == 50
    for key in ("steps", "epochs", "samples", "world_size", "final_loss", "eval_loss", "eval_accuracy",
                "wall_seconds", "samples_per_sec", "model_sha256"):
        assert summary[key] is not None, key
    steps = [m for m in res.metrics() if "loss" in m]
    assert steps and all({"step", "epoch", "samples", "loss", "lr", "samples_per_sec", "world_size"} <= m.keys()
                         for m in steps)
    assert all(m["world_size"] == 2 for m in steps)
    # Progress comes from rank 0 only.
    assert "done:" in res.ranks[0] and "done:" not in res.ranks.get(1, "")


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_two_ranks_follow_one_process(horovodrun, dtrain_local, tmp_path, optimizer):
    """Guarantee 2: np=2 with global batch B ends where one process with batch B ends."""
    args = [*SMALL, "--epochs", "2", "--optimizer", optimizer, "--lr", "0.05" if optimizer == "sgd" else "0.003",
            "--weight-decay", "0.01"]
    one = dtrain_local(args, run_dir=tmp_path / "one").check()
    two = horovodrun(args, run_dir=tmp_path / "two").check()
    assert one.summary()["steps"] == two.summary()["steps"] > 0
    assert max_rel_diff(load_params(two.run_dir), load_params(one.run_dir)) < 1e-5
    assert two.summary()["ranks_identical"] is True  # byte-identical parameters on every rank
    assert abs(one.summary()["eval_loss"] - two.summary()["eval_loss"]) < 1e-4


def test_one_host_shards_the_step_and_checkpoints_the_whole_optimizer(horovodrun, dtrain_local, tmp_path):
    """dtrain/sharded.py: the ranks of one host share the parameters and each steps a shard. The same
    training as every rank stepping the whole (--no-shard), clipping included, and checkpoints in the
    unsharded layout, which one process resumes."""
    args = [*SMALL, "--optimizer", "adamw", "--lr", "0.003", "--weight-decay", "0.01", "--grad-clip", "0.05",
            "--epochs", "2"]
    sharded = horovodrun([*args, "--max-steps", "40"], run_dir=tmp_path / "sharded").check()
    whole = horovodrun([*args, "--max-steps", "40", "--no-shard"], run_dir=tmp_path / "whole").check()
    assert sharded.summary()["sharded_step"] is True and whole.summary()["sharded_step"] is False
    assert max_rel_diff(load_params(sharded.run_dir), load_params(whole.run_dir)) < 1e-5
    assert sharded.summary()["ranks_identical"] is True
    states = [Checkpointer(str(r.run_dir / "checkpoints")).latest() for r in (sharded, whole)]
    (_, mine), (_, theirs) = states
    assert mine["global_step"] == theirs["global_step"] == 40
    assert mine["optimizer"]["param_groups"] == theirs["optimizer"]["param_groups"]
    assert mine["optimizer"]["state"].keys() == theirs["optimizer"]["state"].keys()
    for i, state in theirs["optimizer"]["state"].items():
        assert mine["optimizer"]["state"][i].keys() == state.keys()
        for k, v in state.items():
            torch.testing.assert_close(mine["optimizer"]["state"][i][k], v, rtol=1e-4, atol=1e-7)
    # One process goes on from the sharded checkpoint as from the whole one.
    for r in (sharded, whole):
        res = dtrain_local([*args, "--max-steps", "60"], run_dir=r.run_dir).check()
        assert "resuming from" in res.output and res.summary()["steps"] == 60
    assert max_rel_diff(load_params(sharded.run_dir), load_params(whole.run_dir)) < 1e-4


def test_audit_every_row_exactly_once(horovodrun, tmp_path):
    """Guarantee 1: across ranks, every training row takes part in exactly one step per epoch."""
    audit = tmp_path / "audit"
    res = horovodrun([*SMALL, "--epochs", "2", "--audit-dir", str(audit)]).check()
    stats = json.loads((res.run_dir / "stats.json").read_text())
    train_rows, val_rows = sum(stats["train_sizes"]), sum(stats["val_sizes"])
    records = [json.loads(line) for r in (0, 1) for line in (audit / f"rank-{r}.jsonl").read_text().splitlines()]
    assert {rec["rank"] for rec in records} == {0, 1}
    for epoch in (0, 1):
        rows = Counter(row for rec in records if rec["epoch"] == epoch for row in rec["rows"])
        assert sum(rows.values()) == train_rows
        assert set(rows.values()) == {1}
    # Train and validation rows are disjoint and together make the whole dataset.
    trained = {row for rec in records for row in rec["rows"]}
    assert len(trained) == train_rows and train_rows + val_rows == 5000


def test_bad_flag_exits_2_with_one_line(dtrain_local):
    res = dtrain_local(["--global-batch-size", "0"])
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "--global-batch-size" in lines[0]


def test_missing_data_path_exits_2(dtrain_local, tmp_path):
    res = dtrain_local(["--data", str(tmp_path / "nope")])
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [res.stderr.strip()] and "--data" in res.stderr


def test_unreachable_scheduler_exits_2(dtrain_local):
    res = dtrain_local(["--scheduler", "tcp://127.0.0.1:9", "--connect-timeout", "2"], timeout=60)
    assert res.returncode == 2
    assert "--scheduler" in res.stderr and "Traceback" not in res.stderr
