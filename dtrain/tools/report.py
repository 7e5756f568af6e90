"""Report on run directories: a plain-text summary and a PNG of the curves, one run or several overlaid.

    python -m dtrain.report RUN_DIR                 # summary + RUN_DIR/report.png
    python -m dtrain.report RUN_A RUN_B [--out X.png]   # overlaid (same as --compare): RUN_A/compare.png

Reads only what rank 0 wrote (``config.yaml``, ``metrics.jsonl``, ``summary.json``), so it works on a run
that is still going or was interrupted (no ``summary.json``: reported with its last logged step). It
imports neither torch nor dask, and matplotlib (Agg backend) only when it draws.

``metrics.jsonl`` is appended to by every attempt of a run: after a resume, the steps since the
checkpoint are logged again. The report keeps the last line of each step (the attempt that went on to
the end) and counts the restarts.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import yaml

PROG = "dtrain.report"


class ReportError(Exception):
    """Bad input: reported as one line ``dtrain.report: error: ...; fix``, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        _fail(f"{message}; see python -m {PROG} --help")


def _fail(message: str) -> NoReturn:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    sys.exit(2)


# -- reading a run directory ------------------------------------------------------------------------------


@dataclass
class Run:
    path: Path
    label: str
    config: dict[str, Any]
    summary: dict[str, Any] | None  # None: the run was interrupted (or is still running)
    steps: list[dict[str, Any]]  # training lines ("loss"), one per step, in step order
    evals: list[dict[str, Any]]  # evaluation lines ("eval_loss"), one per step, in step order
    restarts: int = 0  # times the step count went back (resumed from a checkpoint)
    partial_last_line: bool = False  # the last line was cut short (killed while writing)
    world_sizes: list[int] = field(default_factory=list)  # world size of each logged line, file order
    stale_summary_step: int | None = None  # summary.json left by an earlier attempt that ended at this step

    @property
    def complete(self) -> bool:
        return self.summary is not None

    def section(self, name: str) -> dict[str, Any]:
        value = self.config.get(name)
        return value if isinstance(value, dict) else {}


def _read_json_file(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ReportError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); "
                          "restore the file or delete it to report the run as interrupted") from None
    except OSError as e:
        raise ReportError(f"{path}: cannot read ({e.strerror}); check the permissions") from None
    if not isinstance(value, dict):
        raise ReportError(f"{path}: expected a JSON object, got {type(value).__name__}; restore the file")
    return value


def read_metrics(path: Path) -> tuple[list[dict[str, Any]], bool]:
    """A run's metrics lines, and whether a last, half-written line was left out (a live or dead run)."""
    try:
        text = path.read_text()
    except OSError as e:
        raise ReportError(f"{path}: cannot read ({e.strerror}); check the permissions") from None
    lines = text.split("\n")
    # A last line without its newline was being written when the run died: skip it, it is not data.
    partial = bool(lines[-1].strip())
    if partial:
        try:
            json.loads(lines[-1])
            partial = False  # complete JSON, only the newline is missing: keep it
        except json.JSONDecodeError:
            lines = lines[:-1]
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ReportError(f"{path}:{n}: malformed JSON line ({e.msg}); "
                              "remove or repair that line (dtrain writes one JSON object per line)") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("step"), int):
            raise ReportError(f"{path}:{n}: a metrics line must be a JSON object with an integer \"step\"; "
                              "remove or repair that line")
        records.append(rec)
    return records, partial


def _last_per_step(records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    """One record per step (the last written wins) in step order, and how often the step went back."""
    by_step: dict[int, dict[str, Any]] = {}
    restarts, previous = 0, -1
    for rec in records:
        if rec["step"] <= previous:
            restarts += 1
        previous = rec["step"]
        by_step[rec["step"]] = rec
    return [by_step[s] for s in sorted(by_step)], restarts


def load_run(path: str | os.PathLike[str], label: str | None = None) -> Run:
    root = Path(path)
    if not root.is_dir():
        what = "is not a directory" if root.exists() else "does not exist"
        raise ReportError(f"{root} {what}; pass a dtrain run directory (the --run-dir of a run)")
    metrics = root / "metrics.jsonl"
    if not metrics.is_file():
        raise ReportError(f"{root} has no metrics.jsonl (not a run directory, or the run stopped before its "
                          "first metrics line); pass a run directory that logged at least one step")
    records, partial = read_metrics(metrics)
    step_lines = [r for r in records if "loss" in r]
    eval_lines = [r for r in records if "eval_loss" in r]
    if not step_lines and not eval_lines:
        raise ReportError(f"{metrics} has no training or evaluation line; "
                          "pass a run directory that logged at least one step")
    steps, restarts = _last_per_step(step_lines)
    evals, _ = _last_per_step(eval_lines)
    config: dict[str, Any] = {}
    if (root / "config.yaml").is_file():
        try:
            loaded = yaml.safe_load((root / "config.yaml").read_text())
        except yaml.YAMLError as e:
            raise ReportError(f"{root / 'config.yaml'}: not valid YAML ({str(e).splitlines()[0]}); "
                              "restore the file") from None
        config = loaded if isinstance(loaded, dict) else {}
    summary = _read_json_file(root / "summary.json") if (root / "summary.json").is_file() else None
    stale = None
    logged = max(r["step"] for r in records)
    ended = summary.get("steps") if summary is not None else None
    if isinstance(ended, int) and ended < logged:
        # A finished run continued (more --epochs, resumed) and was interrupted: the summary is the old one.
        summary, stale = None, ended
    worlds = [int(r["world_size"]) for r in records if isinstance(r.get("world_size"), int | float)]
    return Run(root, label or root.name or str(root), config, summary, steps, evals, restarts, partial, worlds,
               stale)


# -- text ---------------------------------------------------------------------------------------------------


def _num(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _rate(value: Any) -> str:
    return f"{value:,.0f}" if isinstance(value, int | float) else "-"


def world_changes(run: Run) -> list[tuple[int, int, int]]:
    """``(first step, last step, world size)`` of each stretch of training lines logged with one world size."""
    out: list[tuple[int, int, int]] = []
    for rec in run.steps:
        w = rec.get("world_size")
        if not isinstance(w, int):
            continue
        if out and out[-1][2] == w:
            out[-1] = (out[-1][0], rec["step"], w)
        else:
            out.append((rec["step"], rec["step"], w))
    return out


def throughput_median(run: Run) -> float | None:
    rates = [r["samples_per_sec"] for r in run.steps if isinstance(r.get("samples_per_sec"), int | float)]
    return statistics.median(rates) if rates else None


def final_eval(run: Run) -> dict[str, Any]:
    """The last evaluation: the summary's when complete (online runs evaluate only there), else the log's."""
    keys = ("eval_loss", "eval_accuracy", "eval_r2")
    if run.summary is not None and run.summary.get("eval_loss") is not None:
        return {k: run.summary[k] for k in keys if run.summary.get(k) is not None}
    if run.evals:
        return {k: run.evals[-1][k] for k in keys if run.evals[-1].get(k) is not None}
    return {}


def summarize(run: Run) -> str:
    s = run.summary
    last = run.steps[-1] if run.steps else run.evals[-1]
    train, data, model, optim = run.section("train"), run.section("data"), run.section("model"), run.section("optim")
    lines = [f"run {run.path}"]
    if s is not None:
        lines.append("  status     complete")
    else:
        why = "no summary.json" if run.stale_summary_step is None else \
            f"summary.json is from an earlier attempt that ended at step {run.stale_summary_step}"
        lines.append(f"  status     interrupted or still running ({why}): last logged step {last['step']}"
                     f", epoch {last.get('epoch', '?')}")
    if run.config:
        source = data.get("data") or f"generated ({_num(data.get('gen_rows'))} rows)"
        batch = f"batch {_num(train['batch_per_rank'])} per rank (global batch and lr x ranks)" \
            if train.get("batch_per_rank") else f"global batch {_num(train.get('global_batch_size'))}"
        lines.append(f"  config     {train.get('mode', '?')} {model.get('model', '?')} on {source}; "
                     f"{optim.get('optimizer', '?')} lr {_num(optim.get('lr'))}, {batch}")
    else:
        lines.append("  config     (no config.yaml)")
    steps = s["steps"] if s else last["step"]
    epochs = s.get("epochs") if s else last.get("epoch")
    samples = s.get("samples") if s else next((r.get("samples") for r in reversed(run.steps) if "samples" in r), None)
    epochs_text = f"epochs {_num(epochs)}" if s else f"in epoch {_num(epochs)}"
    lines.append(f"  progress   steps {_num(steps)}, {epochs_text}, samples {_num(samples)}")
    changes = world_changes(run)
    seen = sorted(set(run.world_sizes))
    if len(changes) > 1:
        path = " -> ".join(f"{w} (steps {first}-{end})" for first, end, w in changes)
        world_text = f"{path}; sizes seen {', '.join(map(str, seen))}"
    else:
        world_text = ", ".join(map(str, seen)) if seen else "?"
    if run.restarts:
        world_text += f"; resumed {run.restarts} time{'s' * (run.restarts > 1)}"
    lines.append(f"  world size {world_text}")
    final_loss = s.get("final_loss") if s else (run.steps[-1]["loss"] if run.steps else None)
    ev = final_eval(run)
    quality = [f"final loss {_num(final_loss)}"]
    if "eval_loss" in ev:
        quality.append(f"eval loss {_num(ev['eval_loss'])}")
    if "eval_accuracy" in ev:
        quality.append(f"eval accuracy {_num(ev['eval_accuracy'])}")
    if "eval_r2" in ev:
        quality.append(f"eval R² {_num(ev['eval_r2'])}")
    if s and s.get("progressive_accuracy") is not None:
        quality.append(f"progressive accuracy {_num(s['progressive_accuracy'])}")
    if not ev:
        quality.append("no evaluation yet")
    lines.append(f"  quality    {', '.join(quality)}")
    median = throughput_median(run)
    speed = f"median {_rate(median)} samples/s" if median is not None else "no throughput logged"
    if s:
        attempt = " (last attempt)" if run.restarts or len(changes) > 1 else ""
        speed += f" (overall {_rate(s.get('samples_per_sec'))}), wall {_num(s.get('wall_seconds'))} s{attempt}"
    lines.append(f"  speed      {speed}")
    if s and s.get("model_sha256"):
        lines.append(f"  model      sha256 {str(s['model_sha256'])[:16]}")
    if s and s.get("ranks_identical") is False:
        lines.append("  WARNING    the ranks ended with different models (ranks_identical: false)")
    if run.partial_last_line:
        lines.append("  note       the last metrics line was cut short (killed while writing) and is ignored")
    return "\n".join(lines)


def compare_table(runs: Sequence[Run]) -> str:
    header = ["run", "status", "steps", "world", "final loss", "eval", "samples/s", "wall s", "sha256"]
    rows = [header]
    for run in runs:
        s = run.summary or {}
        ev = final_eval(run)
        metric = ev.get("eval_accuracy", ev.get("eval_r2", ev.get("eval_loss")))
        last_step = run.steps[-1]["step"] if run.steps else run.evals[-1]["step"]
        final_loss = s.get("final_loss") if s else (run.steps[-1]["loss"] if run.steps else None)
        rows.append([
            run.label, "complete" if run.complete else "interrupted", _num(s.get("steps", last_step)),
            "/".join(str(w) for _, _, w in world_changes(run)) or "?", _num(final_loss), _num(metric),
            _rate(throughput_median(run)), _num(s.get("wall_seconds")), str(s.get("model_sha256", "-"))[:12],
        ])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    out = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    hashes = [r.summary.get("model_sha256") for r in runs if r.summary]
    if len(hashes) == len(runs) > 1 and len(set(hashes)) == 1:
        out.append("all runs ended with the same model (equal model_sha256)")
    return "\n".join(out)


# -- plots --------------------------------------------------------------------------------------------------


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], float(r[key])) for r in records if isinstance(r.get(key), int | float)]
    return [p[0] for p in pts], [p[1] for p in pts]


def _quality_metric(runs: Sequence[Run]) -> tuple[str, str]:
    """The key and title of the second panel: eval accuracy where any run has it, else R², else eval loss."""
    for key, title in (("eval_accuracy", "accuracy"), ("eval_r2", "eval R²"), ("eval_loss", "eval loss")):
        if any(key in r for run in runs for r in run.evals) or any(
            run.summary and run.summary.get(key) is not None for run in runs
        ):
            return key, title
    return "eval_accuracy", "accuracy"


def plot(runs: Sequence[Run], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(2, 2, figsize=(12, 8), constrained_layout=True)
    ax_loss, ax_eval, ax_speed, ax_world = axes.flat
    key, title = _quality_metric(runs)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    overlay = len(runs) > 1
    for i, run in enumerate(runs):
        color = colors[i % len(colors)]
        label = run.label if overlay else None
        lw = max(1.0, 2.6 - 0.6 * i) if overlay else 1.5  # overlaid runs that coincide stay visible

        x, y = _series(run.steps, "loss")
        ax_loss.plot(x, y, color=color, linewidth=lw, label=run.label)

        x, y = _series(run.evals, key)
        final = run.summary.get(key) if run.summary else None
        if isinstance(final, int | float) and run.summary and (not x or x[-1] != run.summary.get("steps")):
            x, y = [*x, int(run.summary["steps"])], [*y, float(final)]  # evaluated only at the end
        ax_eval.plot(x, y, color=color, linewidth=lw, marker="o",
                     label=f"{label} (held out)" if overlay else "held out")
        if key == "eval_accuracy":  # the training side: accuracy on the batches (online: before training on them)
            train_key = "progressive_accuracy" if any("progressive_accuracy" in r for r in run.steps) else "accuracy"
            x, y = _series(run.steps, train_key)
            if x:
                name = "progressive" if train_key == "progressive_accuracy" else "train batches"
                ax_eval.plot(x, y, color=color, linewidth=lw, alpha=0.45, linestyle="--",
                             label=f"{label} ({name})" if overlay else name)

        x, y = _series(run.steps, "samples_per_sec")
        ax_speed.plot(x, y, color=color, linewidth=lw, label=label)

        x, y = _series(run.steps, "world_size")
        if x:
            ax_world.step(x, y, where="post", color=color, linewidth=lw, label=label)

    for ax, name, ylabel in ((ax_loss, "training loss", "loss"), (ax_eval, title, title.split()[-1]),
                             (ax_speed, "throughput", "samples/s"), (ax_world, "world size", "ranks")):
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    ax_world.yaxis.set_major_locator(MaxNLocator(integer=True))
    lo, hi = ax_world.get_ylim()
    ax_world.set_ylim(min(0, lo), hi + 0.5)
    if ax_eval.lines:
        ax_eval.legend(fontsize="small")
    if overlay:
        ax_loss.legend(fontsize="small")
    fig.suptitle("dtrain: " + ", ".join(r.label for r in runs))
    try:
        fig.savefig(out, dpi=100)
    except OSError as e:
        raise ReportError(f"--out: cannot write {out} ({e.strerror}); choose a writable path") from None
    finally:
        plt.close(fig)


# -- command line -------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=f"python -m {PROG}",
        description="Summarise dtrain run directories and plot loss, evaluation, throughput and world size. "
        "Several run directories (or --compare) overlay the runs in the same panels.",
    )
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directory written by dtrain (--run-dir)")
    parser.add_argument("--compare", action="store_true",
                        help="overlay the runs with a legend (implied by more than one RUN_DIR)")
    parser.add_argument("--out", metavar="PNG",
                        help="where to write the plot (default: RUN_DIR/report.png; several runs: "
                        "compare.png in the first RUN_DIR)")
    parser.add_argument("--no-plot", action="store_true", help="print the summary only (no matplotlib needed)")
    return parser


def _labels(paths: Sequence[str]) -> list[str]:
    names = [Path(p).resolve().name or str(p) for p in paths]
    return names if len(set(names)) == len(names) else [str(p) for p in paths]


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    compare = args.compare or len(args.runs) > 1
    try:
        runs = [load_run(p, label) for p, label in zip(args.runs, _labels(args.runs), strict=True)]
        for i, run in enumerate(runs):
            print(("\n" if i else "") + summarize(run))
        if len(runs) > 1:
            print("\n" + compare_table(runs))
        if args.no_plot:
            return
        out = Path(args.out) if args.out else runs[0].path / ("compare.png" if compare else "report.png")
        if not out.parent.is_dir():
            raise ReportError(f"--out: directory {out.parent} does not exist; create it or choose another path")
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ReportError("matplotlib is not installed; pip install 'dtrain[report]' or pass --no-plot") from None
        plot(runs, out)
        print(f"\nplot: {out}")
    except ReportError as e:
        _fail(str(e))


if __name__ == "__main__":
    main()
