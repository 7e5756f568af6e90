"""Cluster faults in real runs (issue 23): what the user sees when data, workers or ranks fail."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_storage_faults import problems

pytestmark = pytest.mark.cluster


def _good_files(where: Path, files: int = 3, rows: int = 400) -> None:
    rng = np.random.default_rng(0)
    where.mkdir()
    for i in range(files):
        df = pd.DataFrame({f"f{j}": rng.normal(size=rows).astype("float32") for j in range(4)})
        df["label"] = rng.integers(0, 3, rows)
        df.to_parquet(where / f"part-{i}.parquet")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("fault", ["missing-column", "text-value"])
def test_a_bad_file_among_good_ones_is_one_line_without_worker_logs(dtrain_local, tmp_path, fault):
    data = tmp_path / "data"
    _good_files(data)
    bad = pd.read_parquet(data / "part-0.parquet")
    if fault == "missing-column":
        bad = bad.drop(columns=["f1"])
    else:
        bad["f1"] = bad["f1"].astype(str)
        bad.loc[3, "f1"] = "oops"
    bad.to_parquet(data / "part-9.parquet")
    res = dtrain_local(["--data", str(data), "--epochs", "1"])
    assert res.returncode == 2, res.output[-3000:]
    lines = problems(res.output)
    assert len(lines) == 1 and "Compute Failed" not in res.output, res.output[-3000:]
    assert lines[0].startswith("dtrain: error: --"), lines
    assert ("has no column 'f1'" if fault == "missing-column" else "'oops'") in lines[0]
