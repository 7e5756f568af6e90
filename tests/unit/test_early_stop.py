"""--early-stop's monitor (dtrain/train/early_stop.py): patience, direction, NaN, resume."""

from __future__ import annotations

import pytest

from dtrain.config import Config, ConfigError, DataConfig, TrainConfig, UserError
from dtrain.train.early_stop import Monitor

pytestmark = pytest.mark.unit


def run(monitor: Monitor, values: list[float]) -> Monitor:
    for step, v in enumerate(values, start=1):
        monitor = monitor.update({"eval_loss": v, "eval_accuracy": 1 - v}, step * 10)
        if monitor.should_stop:
            break
    return monitor


def test_stops_after_patience_evaluations_without_improvement():
    m = run(Monitor("eval_loss", 2), [0.9, 0.5, 0.6, 0.5, 0.7, 0.1])
    assert m.should_stop and (m.best, m.best_step, m.waited, m.last_step) == (0.5, 20, 2, 40)
    assert not m.improved


def test_higher_is_better_for_accuracy_and_nan_never_improves():
    m = run(Monitor("eval_accuracy", 3), [0.9, 0.5, float("nan"), 0.6])
    assert (m.best, m.best_step, m.waited) == (0.5, 20, 2)
    m = Monitor("eval_accuracy").update({"eval_accuracy": 0.3}, 5)
    assert m.improved and m.patience is None and not run(m, [0.1] * 10).should_stop


def test_resume_continues_the_same_metric_only():
    m = run(Monitor("eval_loss", 2), [0.9, 0.5, 0.6])
    again = Monitor.resume("eval_loss", 2, m.to_dict())
    assert again == m
    assert run(again, [0.7]).should_stop == run(m, [0.7]).should_stop is True
    assert Monitor.resume("eval_accuracy", 3, m.to_dict()) == Monitor("eval_accuracy", 3)
    assert Monitor.resume("eval_loss", 3, None) == Monitor("eval_loss", 3)


def test_a_metric_the_evaluation_lacks_is_one_line():
    with pytest.raises(UserError, match=r"^--monitor: this run's evaluation has no eval_r2"):
        Monitor("eval_r2", 1).update({"eval_loss": 1.0, "eval_accuracy": 0.5, "eval_rows": 10}, 1)


def test_config_checks():
    with pytest.raises(ConfigError, match=r"^--early-stop: needs evaluations"):
        TrainConfig(early_stop=2, mode="online")
    with pytest.raises(ConfigError, match=r"^--early-stop: needs held-out rows"):
        Config(train=TrainConfig(early_stop=2), data=DataConfig(val_fraction=0))
    with pytest.raises(ConfigError, match=r"^--monitor: unknown value"):
        TrainConfig(monitor="loss")
