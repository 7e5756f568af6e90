"""dtrain.bench's pure logic on small fake inputs: result parsing, statistics, ratios, targets, tables."""

from __future__ import annotations

import json

import pytest

from dtrain.tools import bench
from dtrain.tools import benchstats as bs
from dtrain.tools.benchstats import RatioSpec, Run

pytestmark = pytest.mark.unit


def test_parse_result_finds_the_last_result_line_behind_horovodrun_prefixes():
    out = "\n".join([
        "[1]<stderr>:some warning",
        '[0]<stdout>:BENCH_RESULT {"samples_per_sec": [1.0]}',
        "[0]<stdout>:BENCH_RESULT {not json",
        '[0]<stdout>:BENCH_RESULT {"samples_per_sec": [2.0, 4.0], "world_size": 2}',
        "[0]<stderr>:bye",
    ])
    assert bs.parse_result(out) == {"samples_per_sec": [2.0, 4.0], "world_size": 2}
    assert bs.parse_result("nothing here\n") is None
    assert bs.parse_result("BENCH_RESULT [1, 2]") is None  # not an object


def test_steady_state_skips_warmup_and_evaluation_lines():
    metrics = [
        {"step": 10, "loss": 2.0, "samples_per_sec": 100.0},
        {"step": 20, "loss": 1.0, "samples_per_sec": 900.0},
        {"step": 20, "eval_loss": 1.0},
        {"step": 30, "loss": 0.5, "samples_per_sec": 1000.0},
    ]
    assert bs.steady_state(metrics) == [900.0, 1000.0]
    assert bs.steady_state(metrics[:1]) == [100.0]  # a single line is all there is
    assert bs.steady_state([]) == []


def test_rotation_puts_every_contender_first_once_per_cycle():
    names = ["a", "b", "c"]
    orders = [bs.rotation(names, r) for r in range(3)]
    assert orders == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"]]
    assert {o[0] for o in orders} == set(names)
    assert bs.rotation(names, 4) == orders[1]
    assert bs.rotation([], 2) == []


def test_summarize_takes_the_median_over_runs_and_keeps_failures_apart():
    runs = [Run("x", 10.0, [9.0, 10.0, 11.0], load=1.0), Run("x", 30.0, load=3.0),
            Run("x", 20.0, load=2.0), Run("x", None, load=5.0, error="exit 1\nboom")]
    s = bs.summarize(runs)
    assert s["samples_per_sec"] == 20.0
    assert (s["best"], s["worst"]) == (30.0, 10.0)
    assert s["runs"] == [10.0, 30.0, 20.0]
    assert s["failed"] == 1 and s["errors"] == ["exit 1\nboom"]
    assert s["load"] == [1.0, 3.0, 2.0, 5.0]
    empty = bs.summarize([Run("y", None, error="timed out")])
    assert empty["samples_per_sec"] is None and empty["best"] is None and empty["failed"] == 1


def test_ratio_and_target_checks():
    assert bs.ratio(90.0, 100.0) == pytest.approx(0.9)
    assert bs.ratio(None, 100.0) is None
    assert bs.ratio(90.0, None) is None
    assert bs.ratio(90.0, 0.0) is None
    assert bs.check("a / b", 0.96, 0.95)["met"] is True
    assert bs.check("a / b", 0.95, 0.95)["met"] is True  # the target is inclusive
    assert bs.check("a / b", 0.94, 0.95)["met"] is False
    assert bs.check("a / b", None, 0.95)["met"] is None  # a failed contender: no verdict
    assert bs.check("a / b", 0.5, None) == {"name": "a / b", "ratio": 0.5, "target": None, "met": None,
                                               "best_ratio": None, "bound": ">="}
    assert bs.check("a / b", 0.05, 0.05, at_most=True)["met"] is True  # a ceiling, inclusive too
    assert bs.check("a / b", 0.06, 0.05, at_most=True)["met"] is False
    assert bs.check("a / b", 0.9, 0.95, best=1.1)["best_ratio"] == 1.1  # the best runs: information only


def test_compare_divides_medians_of_the_named_contenders():
    summaries = {"dtrain step": {"samples_per_sec": 300.0}, "ddp": {"samples_per_sec": 200.0},
                 "horovod plain": {"samples_per_sec": None}}
    specs = [RatioSpec("dtrain step", "ddp", 1.0), RatioSpec("dtrain step", "horovod plain", 1.0),
             RatioSpec("dtrain step", "missing")]
    out = bs.compare(summaries, specs)
    assert [c["name"] for c in out] == ["dtrain step / ddp", "dtrain step / horovod plain", "dtrain step / missing"]
    assert out[0]["ratio"] == pytest.approx(1.5) and out[0]["met"] is True
    assert out[0]["best_ratio"] is None  # no "best" in these summaries
    assert out[1]["ratio"] is None and out[1]["met"] is None
    assert out[2]["ratio"] is None and out[2]["target"] is None


def test_format_table_aligns_columns():
    text = bs.format_table(["name", "value"], [["a", "1"], ["longer", "1,000"]])
    lines = text.splitlines()
    assert lines[0] == "name    value"
    assert lines[1] == "------  -----"
    assert lines[2] == "a           1"
    assert lines[3] == "longer  1,000"


def _comparison() -> dict:
    contenders = {
        "bare": bs.summarize([Run("bare", 1000.0, load=0.5), Run("bare", 1100.0, load=0.7)]),
        "dtrain step": bs.summarize([Run("dtrain step", 990.0, load=0.6), Run("dtrain step", 1010.0, load=0.9)]),
        "dtrain e2e": bs.summarize([Run("dtrain e2e", None, load=1.0, error="exit 1\nValueError: bad")]),
    }
    specs = [RatioSpec("dtrain step", "bare", 0.95), RatioSpec("dtrain e2e", "bare")]
    return {"benchmark": "B1", "title": bench.TITLES["B1"], "model": "small", "global_batch": 128,
            "baseline": "bare", "contenders": contenders, "ratios": bs.compare(contenders, specs)}


def test_render_comparison_shows_medians_ratios_targets_and_failures():
    text = bs.render_comparison(_comparison())
    assert "B1 overhead" in text and "model small (100-256-256-10), global batch 128" in text
    bare = next(line for line in text.splitlines() if line.startswith("bare"))
    assert "1,050" in bare and "1.00" in bare and "0.5-0.7" in bare
    step = next(line for line in text.splitlines() if line.startswith("dtrain step"))
    assert "1,000" in step and "0.95" in step  # 1000 / 1050
    assert "dtrain step / bare = 0.952 (best runs: 0.918)  target >= 0.95: MET" in text  # 1010 / 1100
    assert "dtrain e2e / bare = -  (info)" in text
    assert "dtrain e2e failed: ValueError: bad" in text
    assert "1 failed" in text


def test_targets_collects_every_targeted_ratio_and_renders_a_verdict_table():
    report = {"benchmarks": {"B1": {"comparisons": [_comparison()]}, "B6": {"status": "not available yet"}}}
    items = bs.targets(report)
    assert len(items) == 1
    assert items[0]["benchmark"] == "B1" and items[0]["model"] == "small" and items[0]["met"] is True
    table = bs.render_targets(items)
    assert "dtrain step / bare" in table and ">= 0.95" in table and "MET" in table
    assert "0.952" in table and "0.918" in table
    json.dumps(report)  # the report is JSON as it is


def test_paired_ratio_is_the_median_of_every_window_pair():
    runs = [Run("p", 100.0, extra={"paired_ratios": [0.9, 1.0, 1.1]}), Run("p", 100.0, extra={"paired_ratios": [0.96]}),
            Run("p", None, error="exit 1")]
    summary = {**bs.summarize(runs), "extra": [r.extra for r in runs]}
    assert bs.paired_ratio(summary) == (pytest.approx(0.98), 1.0)  # median of 0.9, 0.96, 1.0, 1.1; best run 1.0
    (c,) = bs.compare({"p": summary, "bare": {"samples_per_sec": 50.0}}, [RatioSpec("p", "bare", 0.95, paired=True)])
    assert c["name"] == "p / bare, paired in one process" and c["ratio"] == pytest.approx(0.98) and c["met"] is True
    assert bs.paired_ratio({}) == (None, None)  # every run failed: no verdict


def test_targets_of_the_benchmark_scripts_json():
    b4 = {"runs": {"stream prefetch=auto": {"all_samples_per_sec": [900.0, 700.0, 800.0]},
                   "stream prefetch=8": {"all_samples_per_sec": [10.0]},
                   "pyarrow in-process": {"all_samples_per_sec": [1000.0, 1200.0]}},
          "real_run": {"data_stall_median": 0.07}}
    b5 = {"ratio_async_to_sync": 0.001}
    report = {"benchmarks": {"B4": {"status": "ok", "result": b4}, "B5": {"status": "ok", "result": b5},
                             "B6": {"status": "ok", "result": {"recovery_s": 0.4}}}}
    items = {(t["benchmark"], t["name"]): t for t in bs.targets(report)}
    assert set(items) == {("B4", "stream / pyarrow"), ("B4", "data stall of step time"),
                          ("B5", "async blocking / sync save")}
    stream = items["B4", "stream / pyarrow"]
    assert stream["ratio"] == 800.0 / 1100.0 and stream["best_ratio"] == 900.0 / 1200.0 and stream["met"] is False
    stall = items["B4", "data stall of step time"]
    assert stall["bound"] == "<=" and stall["target"] == 0.05 and stall["met"] is False  # 7% is too much
    assert items["B5", "async blocking / sync save"]["met"] is True
    table = bs.render_targets(list(items.values()))
    assert "<= 0.05" in table and ">= 0.80" in table and "NOT MET" in table
    # A script whose JSON lacks the numbers: a target without a verdict, not a crash.
    assert [t["met"] for t in bs.script_targets("B4", {})] == [None, None]
    # A script that failed keeps its rows in the verdict table, without a verdict (never silently dropped).
    failed = bs.targets({"benchmarks": {"B5": {"status": "failed"}, "B6": {"status": "failed"}}})
    assert [(t["benchmark"], t["met"]) for t in failed] == [("B5", None)]
    assert "n/a" in bs.render_targets(failed)


def test_contenders_of_each_comparison(tmp_path):
    o = bench.Options(repeats=1, quick=True, global_batch=128, models=["small"], dtrain_env={"X": "1"},
                      workdir=str(tmp_path), horovodrun="horovodrun")
    cs, base, specs = bench.contenders("B2", "large", o)
    names = [c.name for c in cs]
    assert names == ["dtrain step", "ddp", "horovod plain", "horovod tuned", "dtrain e2e"]
    assert base == "ddp"
    targeted = {s.name: s.target for s in specs if s.target is not None}
    assert targeted == {"dtrain step / ddp": 1.0, "dtrain step / horovod plain": 1.0}
    by_name = {c.name: c for c in cs}
    assert by_name["horovod tuned"].env == bench.TUNED_HOROVOD
    assert by_name["horovod plain"].env == {}  # untuned: the shell's tuning variables are removed too
    assert by_name["dtrain step"].env == {"X": "1"} and by_name["dtrain e2e"].env == {"X": "1"}
    assert by_name["dtrain e2e"].run_dir and "--hidden" in by_name["dtrain e2e"].cmd
    assert by_name["dtrain step"].cmd[:3] == ["horovodrun", "-np", "2"]
    assert "--model" in by_name["ddp"].cmd and "large" in by_name["ddp"].cmd
    full = bench.Options(repeats=3, quick=False, global_batch=128, models=["small"], dtrain_env={},
                         workdir=str(tmp_path), horovodrun="horovodrun")
    full_cs = {c.name: c for c in bench.contenders("B2", "small", full)[0]}
    assert "horovod example" in full_cs
    assert full_cs["dtrain step gloo"].env == {"DTRAIN_ALLREDUCE": "torch"}  # the transport's worth, beside it
    cs1, _, specs1 = bench.contenders("B1", "small", o)
    assert [c.name for c in cs1] == ["bare", "dtrain step", "dtrain step, paired", "dtrain e2e"]
    assert "horovodrun" not in cs1[1].cmd and cs1[2].cmd[2:4] == ["--model", "small"]
    assert cs1[2].cmd[1].endswith("peers/paired.py") and cs1[2].env == {"X": "1"}
    assert [(s.name, s.target) for s in specs1 if s.target] == [("dtrain step / bare, paired in one process", 0.95)]
    assert [s.target for s in bench.contenders("B3", "small", o)[2] if s.target] == [0.8]


def test_contender_env_drops_the_shells_tuning(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    monkeypatch.setenv("HOROVOD_CYCLE_TIME", "5")
    monkeypatch.setenv("UNRELATED", "kept")
    env = bench.contender_env({"HOROVOD_CYCLE_TIME": "0.1"})
    assert "OMP_NUM_THREADS" not in env and env["HOROVOD_CYCLE_TIME"] == "0.1" and env["UNRELATED"] == "kept"


def test_command_line_rejects_unknown_benchmarks_and_models(capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["B9"])
    assert e.value.code == 2
    with pytest.raises(SystemExit):
        bench.main(["B1", "--models", "huge"])
    assert "benchmarks are" in capsys.readouterr().err


def test_a_missing_benchmark_script_is_reported_not_run(tmp_path):
    o = bench.Options(repeats=1, quick=True, global_batch=128, models=["small"], dtrain_env={},
                      workdir=str(tmp_path), horovodrun="horovodrun")
    result = bench.run_script_bench("B6", "no_such_bench.py", [], o, log=lambda _: None)
    assert result["status"] == "missing" and result["script"] == "benchmarks/no_such_bench.py"
