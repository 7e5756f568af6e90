"""python -m dtrain.report: text summary and plots of run directories (dtrain/tools/report.py)."""

from __future__ import annotations

import json
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import PYTHON, REPO, _env

from dtrain.config import Config
from dtrain.tools import report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_run(root: Path, *, complete: bool = True, online: bool = False, regression: bool = False,
             worlds: tuple[int, ...] = (2, 2, 1, 1), sha: str = "ab" * 32, resumed: bool = False,
             batch_per_rank: int | None = None) -> Path:
    """A run directory as dtrain writes it: 10 steps per metrics line, an evaluation every 20 steps."""
    root.mkdir(parents=True)
    cfg = Config()
    cfg.train.mode = "online" if online else "minibatch"
    cfg.train.global_batch_size = 256
    cfg.train.batch_per_rank = batch_per_rank
    (root / "config.yaml").write_text(cfg.to_yaml())
    lines: list[dict[str, Any]] = []
    for i, world in enumerate(worlds, 1):
        step = 10 * i
        rec: dict[str, Any] = {"step": step, "epoch": (step - 1) // 20, "samples": 256 * step, "loss": 2.0 / i,
                               "lr": 0.001, "samples_per_sec": 1000.0 * i, "world_size": world}
        if not regression:
            rec["progressive_accuracy" if online else "accuracy"] = 0.2 * i
        lines.append(rec)
        if step % 20 == 0 and not online:
            ev: dict[str, Any] = {"step": step, "epoch": (step - 1) // 20, "world_size": world,
                                  "eval_rows": 100.0, "eval_loss": 1.5 / i}
            ev["eval_r2" if regression else "eval_accuracy"] = 0.2 * i
            lines.append(ev)
    if resumed:  # a restart from the checkpoint at step 20: steps 30 and 40 logged again, differently
        lines += [{**r, "loss": r["loss"] / 2} for r in lines if r["step"] > 20 and "loss" in r]
    (root / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    if complete:
        last = lines[-1]
        summary = {"steps": last["step"], "epochs": 2, "samples": 256 * last["step"], "world_size": worlds[-1],
                   "final_loss": [r for r in lines if "loss" in r][-1]["loss"], "eval_loss": 0.375,
                   "eval_accuracy": None if regression else 0.8, "eval_r2": 0.8 if regression else None,
                   "wall_seconds": 12.5, "samples_per_sec": 819.2, "model_sha256": sha,
                   "mode": cfg.train.mode, "task": "regression" if regression else "classification",
                   "ranks_identical": True}
        if online:
            summary["progressive_accuracy"] = 0.5
        (root / "summary.json").write_text(json.dumps(summary))
    return root


def run_report(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    report.main(argv)
    return capsys.readouterr().out


def check_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    width, height = struct.unpack(">II", data[16:24])  # IHDR
    assert (width, height) == (1200, 800)
    assert len(data) > 20_000  # four panels of curves, axes and text: not an empty canvas
    import matplotlib.image

    pixels = matplotlib.image.imread(str(path))
    assert pixels.std() > 0.05  # not a blank image


def expect_error(argv: list[str], capsys: pytest.CaptureFixture[str], *words: str) -> str:
    with pytest.raises(SystemExit) as exc:
        report.main(argv)
    assert exc.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("dtrain.report: error: ") and "; " in lines[0]
    for word in words:
        assert word in lines[0]
    return lines[0]


@pytest.mark.unit
def test_single_run_text_and_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = make_run(tmp_path / "run1")
    out = run_report([str(run)], capsys)
    assert f"run {run}\n" in out
    assert "status     complete" in out
    assert "minibatch mlp on generated (65,536 rows); adamw lr 0.001, global batch 256" in out
    assert "steps 40, epochs 2, samples 10,240" in out
    assert "world size 2 (steps 10-20) -> 1 (steps 30-40); sizes seen 1, 2" in out
    assert "final loss 0.5, eval loss 0.375, eval accuracy 0.8" in out
    assert "median 2,500 samples/s (overall 819), wall 12.5 s (last attempt)" in out
    assert "sha256 abababababababab\n" in out
    assert f"plot: {run / 'report.png'}" in out
    check_png(run / "report.png")


@pytest.mark.unit
def test_per_rank_batch_is_reported_as_such(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = run_report([str(make_run(tmp_path / "run", batch_per_rank=32))], capsys)
    assert "adamw lr 0.001, batch 32 per rank (global batch and lr x ranks)" in out
    assert "global batch 256" not in out


@pytest.mark.unit
def test_compare_overlays_two_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = make_run(tmp_path / "a", worlds=(1, 1, 1, 1))
    b = make_run(tmp_path / "b", worlds=(2, 2, 3, 3))
    out = run_report(["--compare", str(a), str(b), "--out", str(tmp_path / "both.png")], capsys)
    assert f"run {a}\n" in out and f"run {b}\n" in out
    table = out.split("\n\n")[2].splitlines()
    assert table[0].split() == ["run", "status", "steps", "world", "final", "loss", "eval", "samples/s", "wall",
                                "s", "sha256"]
    assert table[1].split()[:4] == ["a", "complete", "40", "1"]
    assert table[2].split()[:4] == ["b", "complete", "40", "2/3"]
    assert "all runs ended with the same model" in out
    check_png(tmp_path / "both.png")
    assert not (a / "report.png").exists()

    # Several run dirs imply --compare; the default plot goes next to the first run; hashes differ.
    c = make_run(tmp_path / "c", sha="cd" * 32)
    out = run_report([str(a), str(c)], capsys)
    assert "same model" not in out
    check_png(a / "compare.png")


@pytest.mark.unit
def test_compare_plot_has_one_curve_per_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)  # keep the figure to look inside
    runs = [report.load_run(make_run(tmp_path / n, worlds=w)) for n, w in (("a", (1, 1, 1, 1)), ("b", (2, 2, 1, 1)))]
    report.plot(runs, tmp_path / "x.png")
    loss, acc, speed, world = figures[0].axes
    assert [ax.get_title() for ax in (loss, acc, speed, world)] == ["training loss", "accuracy", "throughput",
                                                                    "world size"]
    assert [line.get_label() for line in loss.lines] == ["a", "b"]
    assert [list(line.get_xdata()) for line in loss.lines] == [[10, 20, 30, 40]] * 2
    # world size: a step plot, the change visible
    assert [line.get_drawstyle() for line in world.lines] == ["steps-post"] * 2
    assert list(world.lines[1].get_ydata()) == [2, 2, 1, 1]
    # held-out accuracy (markers) and training accuracy (dashed) for each run
    assert [line.get_label() for line in acc.lines] == ["a (held out)", "a (train batches)", "b (held out)",
                                                        "b (train batches)"]
    assert list(acc.lines[0].get_xdata()) == [20, 40]
    assert [t.get_text() for t in loss.get_legend().get_texts()] == ["a", "b"]


@pytest.mark.unit
def test_interrupted_run_reports_last_step(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = make_run(tmp_path / "run", complete=False, worlds=(2, 2, 2))
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 40, "epoch": 1, "samp')  # killed while writing a line
    out = run_report([str(run)], capsys)
    assert "interrupted or still running (no summary.json): last logged step 30, epoch 1" in out
    assert "steps 30, in epoch 1, samples 7,680" in out
    assert "final loss 0.6667, eval loss 0.75, eval accuracy 0.4" in out  # the last logged evaluation
    assert "sha256" not in out
    assert "the last metrics line was cut short" in out
    check_png(run / "report.png")


@pytest.mark.unit
def test_resumed_run_keeps_the_last_attempt_of_each_step(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = report.load_run(make_run(tmp_path / "run", resumed=True))
    assert run.restarts == 1
    assert [r["step"] for r in run.steps] == [10, 20, 30, 40]
    assert [r["loss"] for r in run.steps] == [2.0, 1.0, 2.0 / 3 / 2, 0.5 / 2]
    assert "resumed 1 time" in report.summarize(run)


@pytest.mark.unit
def test_online_and_regression_panels(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    online = report.load_run(make_run(tmp_path / "online", online=True))
    assert online.evals == []
    text = report.summarize(online)
    assert "eval accuracy 0.8" in text and "progressive accuracy 0.5" in text  # the final evaluation
    assert report._quality_metric([online]) == ("eval_accuracy", "accuracy")

    reg = report.load_run(make_run(tmp_path / "reg", regression=True))
    assert "eval R² 0.8" in report.summarize(reg)
    assert "accuracy" not in report.summarize(reg)
    assert report._quality_metric([reg]) == ("eval_r2", "eval R²")
    run_report([str(tmp_path / "online"), str(tmp_path / "reg"), "--out", str(tmp_path / "mixed.png")], capsys)
    check_png(tmp_path / "mixed.png")


@pytest.mark.unit
def test_bad_input_exits_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    expect_error([str(tmp_path / "nope")], capsys, "does not exist")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.yaml").write_text("train: {}\n")
    expect_error([str(tmp_path / "empty")], capsys, "no metrics.jsonl")

    run = make_run(tmp_path / "run")
    lines = (run / "metrics.jsonl").read_text().splitlines()
    lines.insert(2, '{"step": 15, "loss": oops}')
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    expect_error([str(run)], capsys, "metrics.jsonl:3: malformed JSON line")

    (run / "metrics.jsonl").write_text('{"loss": 1.0}\n')
    expect_error([str(run)], capsys, "metrics.jsonl:1", '"step"')

    good = make_run(tmp_path / "good")
    (good / "summary.json").write_text("{not json")
    expect_error([str(good)], capsys, "summary.json")

    fine = make_run(tmp_path / "fine")
    expect_error([str(fine), "--out", str(tmp_path / "missing-dir" / "x.png")], capsys, "--out", "does not exist")
    expect_error([str(fine), "--bogus"], capsys, "unrecognized arguments", "--help")
    expect_error([], capsys, "RUN_DIR")
    assert not (fine / "report.png").exists()


@pytest.mark.unit
@pytest.mark.timeout(60)
def test_module_runs_without_torch(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    code = ("import sys, dtrain.report; "
            "print(sorted(m for m in ('torch', 'dask', 'matplotlib') if m in sys.modules))")
    proc = subprocess.run([PYTHON, "-c", code], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
    proc = subprocess.run([PYTHON, "-m", "dtrain.report", str(run), "--no-plot"], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "status     complete" in proc.stdout and not (run / "report.png").exists()
    proc = subprocess.run([PYTHON, "-m", "dtrain.report", str(tmp_path / "nope")], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and proc.stdout == ""


@pytest.mark.cluster
@pytest.mark.timeout(300)
def test_report_on_a_real_training_run(tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = subprocess.run([PYTHON, "-m", "dtrain", "--gen-rows", "3000", "--epochs", "1", "--log-every", "2",
                           "--run-dir", str(run)], cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=240, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((run / "summary.json").read_text())
    proc = subprocess.run([PYTHON, "-m", "dtrain.report", str(run)], cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "status     complete" in out
    assert f"steps {summary['steps']:,}, epochs 1, samples {summary['samples']:,}" in out
    assert "world size 1\n" in out
    assert f"eval accuracy {summary['eval_accuracy']:.4g}" in out
    assert f"sha256 {summary['model_sha256'][:16]}" in out
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["gen_rows"] == 3000
    check_png(run / "report.png")


@pytest.mark.unit
def test_summary_of_an_earlier_attempt_is_not_taken_for_the_end(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    run = make_run(tmp_path / "run")
    with open(run / "metrics.jsonl", "a") as f:  # continued with more epochs, then interrupted
        f.write(json.dumps({"step": 50, "epoch": 2, "samples": 12800, "loss": 0.25, "samples_per_sec": 900.0,
                            "world_size": 1}) + "\n")
    out = run_report([str(run), "--no-plot"], capsys)
    assert "summary.json is from an earlier attempt that ended at step 40): last logged step 50, epoch 2" in out
    assert "steps 50, in epoch 2, samples 12,800" in out
    assert "final loss 0.25" in out and "sha256" not in out
    assert not (run / "report.png").exists()
