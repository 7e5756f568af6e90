"""benchmarks/gpu_check.py and gpu_check.sh, the CPU side: arguments, preparation, JSON and table, and
the checks' code paths on the CPU with tiny sizes (the GPU machine runs them for real)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
assert _spec is not None and _spec.loader is not None
gc = importlib.util.module_from_spec(_spec)
sys.modules["gpu_check"] = gc  # dataclasses look their module up there
_spec.loader.exec_module(gc)

CANNED = {
    "environment": {"device": "cuda", "gpu": "NVIDIA H200", "torch": "2.11.0", "horovod": "0.28.1",
                    "horovod_nccl_built": True},
    "quick": False,
    "checks": {
        "amp": {"runs": {n: {"eval_accuracy": 0.91, "final_loss": 0.3, "samples_per_sec": 250000.0, "steps": 460,
                             "seconds": 9.0} for n in ("cpu", "gpu", "gpu_amp")},
                "gpu_loss_gap": 0.001, "gpu_accuracy_gap": 0.0, "gpu_amp_loss_gap": 0.02,
                "gpu_amp_accuracy_gap": 0.004, "ok": True, "error": None, "seconds": 40.0},
        "b1": {"models": {"large": {"global_batch": 128, "ratio": 0.97, "dtrain_samples_per_sec": 1.2e5,
                                    "bare_samples_per_sec": 1.24e5, "windows": 6}},
               "target": 0.95, "ok": True, "error": None, "seconds": 20.0},
        "stall": {"ok": False, "error": "CheckTimeout: stall: pinned: still running at the check's deadline",
                  "seconds": 70.0},
    },
}


@pytest.mark.unit
def test_table_of_canned_results_names_every_figure_and_error(tmp_path):
    text = gc.table(CANNED)
    assert text.startswith("gpu_check on NVIDIA H200: torch 2.11.0, horovod 0.28.1 (nccl: yes)")
    assert "| amp | gpu_amp vs cpu: loss curve gap, accuracy gap | 0.02 (<= 0.05), 0.004 (<= 0.01) |" in text
    assert "| b1 | large batch 128: dtrain / bare (paired), samples/s | 0.97 (>= 0.95), 120,000 vs 124,000 |" in text
    assert "| stall | error | CheckTimeout: stall: pinned: still running at the check's deadline |" in text
    assert "| stall | verdict | NOT ok (70 s) |" in text and "checkpoint" not in text
    path = tmp_path / "gpu_check.json"
    path.write_text(json.dumps(CANNED))
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "table", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == text


@pytest.mark.unit
def test_arguments_are_checked_with_one_line_each(capsys):
    assert gc.parser().parse_args(["run", "--out", "o", "--only", "stall,amp"]).only == ["amp", "stall"]
    for argv, words in ((["run", "--out", "o", "--only", "amp,gpu"], "gpu: not a check"),
                        (["run", "--out", "o", "--seconds", "0"], "must be > 0"),
                        (["run"], "--out")):
        with pytest.raises(SystemExit) as e:
            gc.parser().parse_args(argv)
        assert e.value.code == 2 and words in capsys.readouterr().err
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "extra"], capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 2 and "takes no arguments" in proc.stderr
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True,
                          timeout=30, env={"PATH": "/usr/bin:/bin", "DTRAIN_GPU_DIR": "/nonexistent"})
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "gpu_prepare.sh" in proc.stderr
    assert "GPU_CHECK_SECONDS" in subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--help"],
                                                 capture_output=True, text=True, timeout=30).stdout


@pytest.mark.unit
def test_preparation_plans_downloads_keeps_what_it_has_and_drops_other_versions(tmp_path):
    versions = gc.pinned_versions()
    assert versions["dask"] == versions["distributed"]  # distributed pins its dask
    (tmp_path / f"dask-{versions['dask']}-py3-none-any.whl").write_bytes(b"")
    (tmp_path / "zict-0.1.0-py3-none-any.whl").write_bytes(b"")  # an old version: two stop the install
    (tmp_path / "horovod-0.28.1.tar.gz").write_bytes(b"")
    downloads, stale = gc.plan(tmp_path, versions)
    have = {d.name for d in downloads if d.present}
    assert have == {"dask", "horovod"} and [p.name for p in stale] == ["zict-0.1.0-py3-none-any.whl"]
    assert {d.name for d in downloads} == {*gc.CARRIED, "cmake", "horovod"}
    wheel = gc.pip_download(next(d for d in downloads if d.name == "tornado"), tmp_path)
    assert wheel[-1] == f"tornado=={versions['tornado']}" and "--only-binary" in wheel and "3.12" in wheel
    assert "--no-binary" in gc.pip_download(next(d for d in downloads if d.kind == "sdist"), tmp_path)
    setup = (REPO / "launch" / "setup.sh").read_text()
    assert f"HOROVOD_VERSION={gc.HOROVOD_VERSION}" in setup  # one Horovod, here and there
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "prepare", "--dir",
                           str(tmp_path), "--dry-run"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "remove   zict-0.1.0" in proc.stdout and "have     horovod==0.28.1" in proc.stdout
    assert (tmp_path / "zict-0.1.0-py3-none-any.whl").exists()  # a dry run changes nothing


@pytest.mark.unit
def test_figures_from_runs():
    assert gc.curve_gap({10: 1.0, 20: 0.5}, {10: 1.0, 20: 0.4, 30: 0.3}) == pytest.approx(0.125)
    assert gc.curve_gap({10: 1.0}, {20: 1.0}) is None
    assert gc.stall_share([{"data_stall": 0.9}, {"data_stall": 0.02}, {"data_stall": 0.04}]) == pytest.approx(0.03)
    budget = gc.Budget(100, ["amp", "b1", "stall"])
    assert budget.take("amp") == pytest.approx(100 * 3 / 7, abs=0.5)


@pytest.mark.cluster
@pytest.mark.timeout(240)
def test_b1_check_runs_on_cpu_and_writes_json_and_table(tmp_path):
    """B1's paired run on the device the machine has (here the CPU), through the check's own code."""
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "run", "--device", "cpu",
                           "--quick", "--only", "b1", "--out", str(tmp_path), "--seconds", "200"],
                          capture_output=True, text=True, timeout=230, cwd=REPO)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    results = json.loads((tmp_path / "gpu_check.json").read_text())
    b1 = results["checks"]["b1"]
    assert b1["error"] is None and b1["models"]["small"]["ratio"] > 0, b1
    assert results["environment"]["device"] == "cpu" and "| b1 | verdict |" in proc.stdout
    assert (tmp_path / "runs.log").read_text().count("BENCH_RESULT") == 1
