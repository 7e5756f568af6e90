"""The benchmark suite's pure logic: result lines, statistics, ratios, targets and tables (unit-tested).

Apart from ``bench.py``, which runs the contenders, so that what the numbers mean can be read and
tested without running anything.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

RESULT_PREFIX = "BENCH_RESULT "
MODELS = {"small": "100-256-256-10", "large": "100-2048-2048-10"}


def parse_result(output: str) -> dict[str, Any] | None:
    """The ``BENCH_RESULT {json}`` line of a contender's output (horovodrun's ``[0]<stdout>:`` prefix allowed)."""
    for line in reversed(output.splitlines()):
        at = line.find(RESULT_PREFIX)
        if at >= 0:
            try:
                value = json.loads(line[at + len(RESULT_PREFIX):])
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict):
                return value
    return None


def steady_state(metrics: Sequence[dict[str, Any]], skip: int = 1) -> list[float]:
    """Samples/s of a run's training metrics lines, without the first ``skip`` (start-up, first fetch)."""
    rates = [float(m["samples_per_sec"]) for m in metrics if "loss" in m and "samples_per_sec" in m]
    return rates[skip:] if len(rates) > skip else rates


def rotation(names: Sequence[str], repeat: int) -> list[str]:
    """The order of the contenders in repeat ``repeat``: rotated by one each time, so each goes first
    (and last) equally often over ``len(names)`` repeats."""
    if not names:
        return []
    k = repeat % len(names)
    return [*names[k:], *names[:k]]


@dataclass
class Run:
    """One process (or job) of one contender."""

    contender: str
    samples_per_sec: float | None  # median of its windows; None when it failed
    windows: list[float] = field(default_factory=list)
    load: float | None = None  # 1-minute load average when it started
    seconds: float = 0.0
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def summarize(runs: Sequence[Run]) -> dict[str, Any]:
    """A contender's figures over its runs: the median (the headline), best, spread, loads, errors."""
    ok = [r.samples_per_sec for r in runs if r.samples_per_sec is not None]
    loads = [r.load for r in runs if r.load is not None]
    return {
        "samples_per_sec": median(ok),
        "best": max(ok) if ok else None,
        "worst": min(ok) if ok else None,
        "runs": ok,
        "windows": [r.windows for r in runs],
        "load": loads,
        "failed": sum(r.samples_per_sec is None for r in runs),
        "errors": [r.error for r in runs if r.error],
    }


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def check(name: str, value: float | None, target: float | None, best: float | None = None,
          at_most: bool = False) -> dict[str, Any]:
    """A ratio of medians with its target (``met`` is None without a target or without a value), and
    the ratio of the best runs beside it (on a loaded machine, the better guess of a quiet one's).
    The target is a floor, or with ``at_most`` a ceiling (a fraction of time lost, say)."""
    met = None if target is None or value is None else (value <= target if at_most else value >= target)
    return {"name": name, "ratio": value, "target": target, "met": met, "best_ratio": best,
            "bound": "<=" if at_most else ">="}


@dataclass
class RatioSpec:
    """``numerator / denominator`` of two contenders' medians, with an optional target (>=).

    ``paired``: the numerator contender timed both steps in one process (``peers/paired.py``); the
    ratio is the median of its windows' pairwise ratios, and ``denominator`` names what it was paired with.
    """

    numerator: str
    denominator: str
    target: float | None = None
    paired: bool = False

    @property
    def name(self) -> str:
        if self.paired:  # the contender "dtrain step, paired": "dtrain step / bare, paired in one process"
            return f"{self.numerator.removesuffix(', paired')} / {self.denominator}, paired in one process"
        return f"{self.numerator} / {self.denominator}"


def paired_ratio(summary: dict[str, Any]) -> tuple[float | None, float | None]:
    """The median of a paired contender's window ratios over all its runs, and its best run's median."""
    runs = [[float(r) for r in extra.get("paired_ratios", [])] for extra in summary.get("extra", [])]
    runs = [r for r in runs if r]
    every = [r for run in runs for r in run]
    return median(every), max((statistics.median(run) for run in runs), default=None)


def compare(summaries: dict[str, dict[str, Any]], specs: Sequence[RatioSpec]) -> list[dict[str, Any]]:
    def of(name: str, key: str) -> float | None:
        value: float | None = summaries.get(name, {}).get(key)
        return value

    out = []
    for s in specs:
        if s.paired:
            value, best = paired_ratio(summaries.get(s.numerator, {}))
            out.append(check(s.name, value, s.target, best))
        else:
            out.append(check(s.name, ratio(of(s.numerator, "samples_per_sec"), of(s.denominator, "samples_per_sec")),
                             s.target, ratio(of(s.numerator, "best"), of(s.denominator, "best"))))
    return out


def number(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def verdict(met: bool | None) -> str:
    return {True: "MET", False: "NOT MET", None: "n/a"}[met]


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned first column, right-aligned others, widths fitted to the content."""
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows, strict=True)]
    lines = []
    for i, row in enumerate([headers, *rows]):
        cells = [str(c).ljust(w) if j == 0 else str(c).rjust(w) for j, (c, w) in enumerate(zip(row, widths,
                                                                                                 strict=True))]
        lines.append("  ".join(cells).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def render_comparison(comp: dict[str, Any]) -> str:
    """A comparison (one benchmark, one model) as text: the contenders' table, then its ratios."""
    base = comp.get("baseline")
    base_sps = comp["contenders"].get(base, {}).get("samples_per_sec") if base else None
    headers = ["contender", "samples/s (median)", "best", "worst", "runs", "load"]
    if base:
        headers.append(f"vs {base}")
    rows = []
    for name, s in comp["contenders"].items():
        loads = s.get("load") or []
        load = f"{min(loads):.1f}-{max(loads):.1f}" if loads else "-"
        runs = f"{len(s.get('runs', []))}" + (f" ({s['failed']} failed)" if s.get("failed") else "")
        row = [name, number(s.get("samples_per_sec")), number(s.get("best")), number(s.get("worst")), runs, load]
        if base:
            row.append(number(ratio(s.get("samples_per_sec"), base_sps), 2))
        rows.append(row)
    out = [f"{comp['benchmark']} {comp['title']}: model {comp['model']} ({MODELS.get(comp['model'], '?')}), "
           f"global batch {comp['global_batch']}", format_table(headers, rows)]
    for c in comp["ratios"]:
        goal = (f"target {c.get('bound', '>=')} {c['target']:.2f}: {verdict(c['met'])}" if c["target"] is not None
                else "(info)")
        best = f" (best runs: {number(c['best_ratio'], 3)})" if c.get("best_ratio") is not None else ""
        out.append(f"  {c['name']} = {number(c['ratio'], 3)}{best}  {goal}")
    for name, s in comp["contenders"].items():
        for e in s.get("errors", [])[:1]:
            out.append(f"  ! {name} failed: {e.strip().splitlines()[-1] if e.strip() else e}")
    return "\n".join(out)


def script_targets(bench: str, result: dict[str, Any]) -> list[dict[str, Any]]:
    """The targets of a benchmark script's JSON (B4's stream and stall, B5's blocking); none for others.

    B4's runs each list the samples/s of every repeat: the ratio is of their medians, as for the
    comparisons, and the best runs' ratio stands beside it.
    """
    if bench == "B4":
        runs, stall = result.get("runs", {}), result.get("real_run", {}).get("data_stall_median")
        stream, arrow = (runs.get(k, {}).get("all_samples_per_sec") or [] for k in ("stream prefetch=auto",
                                                                                   "pyarrow in-process"))
        medians = ratio(statistics.median(stream), statistics.median(arrow)) if stream and arrow else None
        best = ratio(max(stream), max(arrow)) if stream and arrow else None
        return [check("stream / pyarrow", medians, 0.8, best),
                check("data stall of step time", stall, 0.05, at_most=True)]
    if bench == "B5":
        return [check("async blocking / sync save", result.get("ratio_async_to_sync"), 0.10, at_most=True)]
    return []


def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Every ratio that has a target, over all comparisons and benchmark scripts, labelled with
    benchmark and model."""
    out = []
    for bench, b in report["benchmarks"].items():
        for comp in b.get("comparisons", []):
            for c in comp["ratios"]:
                if c["target"] is not None:
                    out.append({**c, "benchmark": comp["benchmark"], "model": comp["model"]})
        if "comparisons" not in b:  # a script's: a failed one still shows its targets, without a verdict
            result = b.get("result", {}) if b.get("status") == "ok" else {}
            out += [{**c, "benchmark": bench, "model": "-"} for c in script_targets(bench, result)]
    return out


def render_targets(items: Sequence[dict[str, Any]]) -> str:
    rows = [[t["benchmark"], t["model"], t["name"], number(t["ratio"], 3), number(t.get("best_ratio"), 3),
             f"{t.get('bound', '>=')} {t['target']:.2f}", verdict(t["met"])] for t in items]
    return format_table(["bench", "model", "ratio", "median", "best", "target", "result"], rows)
