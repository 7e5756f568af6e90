"""--schedule exponential: lr * lr_decay ** t, t in optimizer steps after warm-up or in epochs trained."""

from __future__ import annotations

import pytest

from dtrain.config import Config, ConfigError, OptimConfig, TrainConfig
from dtrain.train.schedule import lr_factor

pytestmark = pytest.mark.unit


def config(per: str, warmup: int = 0, decay: float = 0.5) -> Config:
    return Config(optim=OptimConfig(schedule="exponential", lr_decay=decay, decay_per=per, warmup_steps=warmup))


def test_per_step_counts_optimizer_steps_after_warm_up():
    cfg = config("step", warmup=4)
    assert [lr_factor(cfg, s, 100) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert [lr_factor(cfg, s, 100) for s in range(4, 8)] == [1.0, 0.5, 0.25, 0.125]


def test_per_epoch_counts_the_data_trained_whatever_the_steps():
    cfg = config("epoch")
    assert lr_factor(cfg, 0, 100, epochs_trained=0.0) == 1.0
    assert lr_factor(cfg, 10, 100, epochs_trained=2.0) == 0.25
    assert lr_factor(cfg, 10, 100, epochs_trained=1.5) == pytest.approx(0.5**1.5)
    # A refit (another world's global batch: other totals, a start mid-schedule) changes nothing: the
    # rate follows the rows trained, which do not depend on the world.
    assert lr_factor(cfg, 37, 55, (20, 0.4), epochs_trained=2.0) == 0.25


def test_exponential_config_is_checked():
    with pytest.raises(ConfigError, match=r"^--lr-decay: must be in \(0, 1\]"):
        OptimConfig(schedule="exponential", lr_decay=1.5)
    with pytest.raises(ConfigError, match=r"^--decay-per: unknown value"):
        OptimConfig(schedule="exponential", decay_per="week")
    with pytest.raises(ConfigError, match=r"^--decay-per: epoch has no meaning in --mode online"):
        Config(optim=OptimConfig(schedule="exponential"), train=TrainConfig(mode="online"))
    Config(optim=OptimConfig(schedule="exponential", decay_per="step"), train=TrainConfig(mode="online"))
