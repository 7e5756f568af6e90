"""Typed configuration (dtrain/config.py) and the command line derived from it (dtrain/cli.py)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import yaml

from dtrain import cli
from dtrain.config import (
    ClusterConfig,
    Config,
    ConfigError,
    DataConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    TrainConfig,
    UserError,
    section_fields,
)

pytestmark = pytest.mark.unit


def flag_of(name: str) -> str:
    return "--" + name.replace("_", "-")


# (section class, field, invalid value): each must raise ConfigError naming the field's flag.
INVALID = [
    (ClusterConfig, "scheduler", "localhost:8786"),
    (ClusterConfig, "scheduler", "http://host:8786"),
    (ClusterConfig, "dask_workers", -1),
    (ClusterConfig, "connect_timeout", 0.0),
    (ClusterConfig, "connect_timeout", -5.0),
    (DataConfig, "format", "xls"),
    (DataConfig, "task", "ranking"),
    (DataConfig, "val_fraction", 1.0),
    (DataConfig, "val_fraction", -0.1),
    (DataConfig, "shuffle_window", 0),
    (DataConfig, "prefetch", 0),
    (DataConfig, "gen_rows", 0),
    (DataConfig, "gen_features", -2),
    (DataConfig, "gen_partitions", 0),
    (DataConfig, "gen_classes", 1),
    (DataConfig, "gen_noise", -0.5),
    (ModelConfig, "model", "nosuch"),
    (ModelConfig, "model", "pkg.module"),
    (ModelConfig, "hidden", [64, 0]),
    (ModelConfig, "dropout", 1.0),
    (ModelConfig, "dropout", -0.1),
    (OptimConfig, "optimizer", "rmsprop"),
    (OptimConfig, "schedule", "linear"),
    (OptimConfig, "lr", 0.0),
    (OptimConfig, "lr", -1e-3),
    (OptimConfig, "weight_decay", -1.0),
    (OptimConfig, "warmup_steps", -1),
    (OptimConfig, "momentum", 1.0),
    (OptimConfig, "momentum", -0.5),
    (OptimConfig, "grad_clip", 0.0),
    (TrainConfig, "mode", "batch"),
    (TrainConfig, "global_batch_size", 0),
    (TrainConfig, "epochs", 0),
    (TrainConfig, "max_steps", 0),
    (TrainConfig, "log_every", 0),
    (TrainConfig, "eval_batch_size", -1),
    (RunConfig, "checkpoint_every", -1),
    (RunConfig, "keep", 0),
]


def _id(case: tuple[type, str, Any]) -> str:
    return f"{case[1]}={case[2]!r}"


def as_cli_value(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


# -- the dataclasses --------------------------------------------------------------------------------------


def test_defaults_construct() -> None:
    cfg = Config()
    assert cfg.train.global_batch_size == 256
    assert cfg.data.shuffle is True
    assert cfg.data.drop_last is False
    assert cfg.model.hidden == [128, 128]
    assert cfg.cluster.scheduler is None
    assert cfg.run.resume == "auto"
    # List defaults are not shared between instances.
    other = Config()
    other.model.hidden.append(7)
    assert Config().model.hidden == [128, 128]


def test_every_field_has_a_doc_line_and_a_unique_name() -> None:
    fields = section_fields()
    assert len(fields) > 30
    names = [f.name for _, _, f in fields]
    assert len(names) == len(set(names))
    sections = {s for s, _, _ in fields}
    assert sections == {f.name for f in dataclasses.fields(Config)}
    for section, cls, f in fields:
        text = f.metadata.get("doc")
        assert isinstance(text, str), f"{section}.{f.name} has no doc"
        assert text.strip(), f"{section}.{f.name} has an empty doc"
        assert (cls.__doc__ or "").strip(), f"section {section} has no docstring"


@pytest.mark.parametrize("case", INVALID, ids=_id)
def test_invalid_values_raise_config_error_naming_the_flag(case: tuple[type, str, Any]) -> None:
    cls, name, value = case
    with pytest.raises(ConfigError) as info:
        cls(**{name: value})
    assert isinstance(info.value, UserError)
    assert info.value.flag == flag_of(name)
    message = str(info.value)
    assert message.startswith(flag_of(name) + ":"), message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("cls", "kwargs"),
    [
        (ClusterConfig, {"scheduler": "tcp://10.0.0.5:8786", "dask_workers": 0}),
        (ClusterConfig, {"scheduler": "inproc://host"}),
        (DataConfig, {"val_fraction": 0.0, "gen_noise": 0.0, "gen_classes": 2}),
        (ModelConfig, {"model": "my_pkg.models:factory", "hidden": [], "dropout": 0.0}),
        (ModelConfig, {"model": "cnn"}),
        (OptimConfig, {"optimizer": "sgd", "weight_decay": 0.0, "warmup_steps": 0, "momentum": 0.0}),
        (OptimConfig, {"grad_clip": None}),
        (TrainConfig, {"mode": "online", "max_steps": None}),
        (RunConfig, {"checkpoint_every": 0, "keep": 1}),
    ],
)
def test_boundary_values_are_accepted(cls: type, kwargs: dict[str, Any]) -> None:
    obj = cls(**kwargs)
    for k, v in kwargs.items():
        assert getattr(obj, k) == v


def test_yaml_round_trip_of_the_resolved_config() -> None:
    cfg = Config(train=TrainConfig(global_batch_size=32, max_steps=10), model=ModelConfig(hidden=[8]))
    assert Config.from_dict(yaml.safe_load(cfg.to_yaml())) == cfg
    assert Config.from_dict(cfg.to_dict()) == cfg
    assert Config.from_dict({}) == Config()


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        ({"trainer": {"epochs": 1}}, "unknown section 'trainer'"),
        ({"train": {"epoch": 1}}, "unknown field train.epoch"),
        ({"train": {"lr": 0.1}}, "unknown field train.lr"),  # exists, but in another section
    ],
)
def test_from_dict_rejects_unknown_names(raw: dict[str, Any], match: str) -> None:
    with pytest.raises(UserError, match=match) as info:
        Config.from_dict(raw)
    assert not isinstance(info.value, ConfigError)


# -- parse_config: flags, YAML, precedence ----------------------------------------------------------------


def write_yaml(tmp_path: Path, raw: Any, name: str = "run.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw) if not isinstance(raw, str) else raw)
    return str(path)


def test_no_flags_gives_the_defaults() -> None:
    assert cli.parse_config([]) == Config()


def test_flags_set_typed_values() -> None:
    cfg = cli.parse_config([
        "--global-batch-size", "64", "--lr", "0.05", "--hidden", "64,32", "--model", "linear",
        "--scheduler", "tcp://127.0.0.1:8786", "--features", "a,b,c", "--max-steps", "100",
        "--grad-clip", "1.5", "--val-fraction", "0.25", "--epochs", "2",
    ])
    assert cfg.train.global_batch_size == 64
    assert cfg.optim.lr == 0.05
    assert cfg.model.hidden == [64, 32]
    assert cfg.model.model == "linear"
    assert cfg.cluster.scheduler == "tcp://127.0.0.1:8786"
    assert cfg.data.features == ["a", "b", "c"]
    assert cfg.train.max_steps == 100
    assert cfg.optim.grad_clip == 1.5
    assert cfg.data.val_fraction == 0.25
    assert cfg.train.epochs == 2
    assert type(cfg.train.global_batch_size) is int
    assert type(cfg.optim.lr) is float
    assert all(type(h) is int for h in cfg.model.hidden)
    # Untouched fields keep their defaults.
    assert cfg.run == RunConfig()


@pytest.mark.parametrize(
    ("value", "expected"), [("64,32", [64, 32]), ("64, 32", [64, 32]), ("16", [16]), ("8,", [8]), ("", [])]
)
def test_list_flags_split_on_commas(value: str, expected: list[int]) -> None:
    assert cli.parse_config(["--hidden", value]).model.hidden == expected


@pytest.mark.parametrize(
    ("argv", "shuffle", "drop_last"),
    [
        ([], True, False),
        (["--no-shuffle"], False, False),
        (["--shuffle"], True, False),
        (["--drop-last"], True, True),
        (["--no-shuffle", "--drop-last", "--no-drop-last"], False, False),
    ],
)
def test_boolean_flags(argv: list[str], shuffle: bool, drop_last: bool) -> None:
    cfg = cli.parse_config(argv)
    assert cfg.data.shuffle is shuffle
    assert cfg.data.drop_last is drop_last


def test_yaml_file(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, {
        "train": {"global_batch_size": 48, "epochs": 5, "seed": 7},
        "model": {"hidden": [16, 8], "dropout": 0.2},
        "data": {"shuffle": False, "features": "x1,x2"},
        "optim": {"optimizer": "sgd", "nesterov": "yes"},
    })
    cfg = cli.parse_config(["--config", path])
    assert cfg.train.global_batch_size == 48
    assert cfg.train.epochs == 5
    assert cfg.train.seed == 7
    assert cfg.model.hidden == [16, 8]
    assert cfg.model.dropout == 0.2
    assert cfg.data.shuffle is False
    assert cfg.data.features == ["x1", "x2"]
    assert cfg.optim.optimizer == "sgd"
    assert cfg.optim.nesterov is True
    assert cfg.run == RunConfig()


def test_flags_override_yaml(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, {
        "train": {"global_batch_size": 48, "epochs": 5},
        "optim": {"lr": 0.1},
        "data": {"shuffle": False},
        "model": {"hidden": [16]},
    })
    cfg = cli.parse_config(["--lr", "0.5", "--config", path, "--shuffle", "--hidden", "4,4,4"])
    assert cfg.optim.lr == 0.5  # flag wins, even before --config on the line
    assert cfg.data.shuffle is True
    assert cfg.model.hidden == [4, 4, 4]
    assert cfg.train.global_batch_size == 48  # YAML kept where no flag is given
    assert cfg.train.epochs == 5


def test_yaml_with_the_resolved_config_of_a_run(tmp_path: Path) -> None:
    cfg = Config(optim=OptimConfig(lr=0.01, grad_clip=2.0), data=DataConfig(drop_last=True))
    path = tmp_path / "config.yaml"
    path.write_text(cfg.to_yaml())
    assert cli.parse_config(["--config", str(path)]) == cfg


def test_empty_yaml_file_gives_defaults(tmp_path: Path) -> None:
    assert cli.parse_config(["--config", write_yaml(tmp_path, "")]) == Config()


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        ({"bogus": {"x": 1}}, r"unknown section 'bogus'"),
        ({"train": {"bogus_field": 1}}, r"unknown field train\.bogus_field"),
        ("- just\n- a list\n", r"^--config: .* must hold a mapping"),
        ("train: [unclosed\n", r"^--config: .* is not valid YAML"),
    ],
)
def test_bad_yaml_raises_user_error(tmp_path: Path, raw: Any, match: str) -> None:
    path = write_yaml(tmp_path, raw)
    with pytest.raises(UserError, match=match):
        cli.parse_config(["--config", path])


@pytest.mark.parametrize("section_value", [5, 2.5, True, "abc", [1, 2]])
def test_yaml_section_that_is_not_a_mapping_is_a_user_error(
    tmp_path: Path, section_value: Any, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # e.g. "train: 5": bad input must be a one-line error (exit 2), never a traceback.
    monkeypatch.delenv("HOROVOD_RANK", raising=False)
    path = write_yaml(tmp_path, {"train": section_value})
    with pytest.raises(UserError, match="train"):
        cli.parse_config(["--config", path])
    line = run_main_expecting_error(["--config", path], capsys)
    assert "train" in line


def test_missing_yaml_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"^--config: no such file"):
        cli.parse_config(["--config", str(tmp_path / "absent.yaml")])


@pytest.mark.parametrize(
    ("raw", "flag"),
    [
        ({"train": {"global_batch_size": "abc"}}, "--global-batch-size"),
        ({"train": {"global_batch_size": 2.5}}, "--global-batch-size"),
        ({"train": {"global_batch_size": 0}}, "--global-batch-size"),
        ({"model": {"hidden": [8, "x"]}}, "--hidden"),
        ({"data": {"shuffle": "maybe"}}, "--shuffle"),
        ({"optim": {"lr": "fast"}}, "--lr"),
    ],
)
def test_bad_yaml_values_name_the_flag(tmp_path: Path, raw: dict[str, Any], flag: str) -> None:
    with pytest.raises(ConfigError) as info:
        cli.parse_config(["--config", write_yaml(tmp_path, raw)])
    assert str(info.value).startswith(flag + ":")


# -- main(): one line on stderr, exit status 2 ------------------------------------------------------------


@pytest.fixture
def rank0(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HOROVOD_RANK", raising=False)


def run_main_expecting_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("dtrain: error:"), lines[0]
    return lines[0]


@pytest.mark.usefixtures("rank0")
@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--global-batch-size", "0"], "--global-batch-size"),
        (["--model", "nosuch"], "--model"),
        (["--bogus-flag"], "--bogus-flag"),
        (["--lr", "abc"], "--lr"),
        (["--hidden", "64,x"], "--hidden"),
        (["--epochs", "1.5"], "--epochs"),
        (["--global-batch-size"], "--global-batch-size"),
        (["--scheduler", "localhost"], "--scheduler"),
        (["--shuffle=yes"], "--shuffle"),
    ],
)
def test_main_reports_bad_flags_in_one_line(
    argv: list[str], flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    line = run_main_expecting_error(argv, capsys)
    assert flag in line


@pytest.mark.usefixtures("rank0")
@pytest.mark.parametrize("case", INVALID, ids=_id)
def test_main_reports_every_invalid_value(case: tuple[type, str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    _, name, value = case
    line = run_main_expecting_error([flag_of(name), as_cli_value(value)], capsys)
    assert line.startswith(f"dtrain: error: {flag_of(name)}:"), line


@pytest.mark.usefixtures("rank0")
def test_main_reports_yaml_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_yaml(tmp_path, {"train": {"nosuch": 1}})
    line = run_main_expecting_error(["--config", path], capsys)
    assert "unknown field train.nosuch" in line
    line = run_main_expecting_error(["--config", str(tmp_path / "absent.yaml")], capsys)
    assert line.startswith("dtrain: error: --config:")


def test_only_rank_zero_prints(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("HOROVOD_RANK", "1")
    with pytest.raises(SystemExit) as info:
        cli.main(["--global-batch-size", "0"])
    assert info.value.code == 2
    assert capsys.readouterr().err == ""


# -- --help -----------------------------------------------------------------------------------------------


def expected_default(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(map(str, value)) or "(none)"
    return "(none)" if value is None else str(value)


def test_help_lists_every_flag_with_its_doc_and_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "1000")  # no wrapping: each help text stays on one line
    text = cli.build_parser().format_help()
    flat = " ".join(text.split())
    defaults = Config()
    for section, _, f in section_fields():
        flag = flag_of(f.name)
        assert f" {flag} " in flat or f"[{flag} " in flat or f" {flag}," in flat, flag
        default = getattr(getattr(defaults, section), f.name)
        doc_line = " ".join(f.metadata["doc"].split())
        assert f"{doc_line} (default: {expected_default(default)})" in flat, flag
        assert f"\n{section}:\n" in text, section
    for snippet in [
        "--global-batch-size INT",
        "(default: 256)",
        "--hidden INT,...",
        "(default: 128,128)",
        "--shuffle, --no-shuffle",
        "--scheduler STR",
        "--config YAML",
        "--optimizer {sgd,adam,adamw,adagrad}",  # a Literal field shows its choices
        "--monitor {eval_loss,eval_accuracy,eval_r2}",
    ]:
        assert snippet in flat, snippet
    assert "==SUPPRESS==" not in text


def test_every_field_is_settable_from_the_command_line() -> None:
    # Passing each default explicitly (as text, the way a user would) resolves to the defaults.
    defaults = Config()
    argv: list[str] = []
    for section, _, f in section_fields():
        value = getattr(getattr(defaults, section), f.name)
        flag = flag_of(f.name)
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        elif value is not None:
            argv += [flag, as_cli_value(value)]
    assert cli.parse_config(argv) == defaults
    # Nothing given, nothing set: YAML values are not overwritten by parser defaults.
    assert vars(cli.build_parser().parse_args([])) == {}


def test_lr_schedules() -> None:
    from dtrain.config import OptimConfig
    from dtrain.train.schedule import lr_factor

    def cfg(**kw: object) -> Config:
        return Config(optim=OptimConfig(**kw))  # type: ignore[arg-type]

    assert [lr_factor(cfg(warmup_steps=4), s, 100) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert lr_factor(cfg(schedule="cosine"), 0, 100) == 1.0
    assert lr_factor(cfg(schedule="cosine"), 100, 100) == pytest.approx(0.0)
    assert lr_factor(cfg(schedule="step"), 50, 100) == pytest.approx(0.1)
    inv = cfg(schedule="invscaling", power_t=0.5)
    assert [lr_factor(inv, s, 100) for s in (0, 3, 99)] == pytest.approx([1.0, 0.5, 0.1])


def test_dry_run_prints_resolved_config_and_checks_paths(capsys: pytest.CaptureFixture[str], tmp_path) -> None:
    from dtrain import cli

    cli.main(["--dry-run", "--lr", "0.25", "--hidden", "8,4"])
    printed = capsys.readouterr().out
    assert Config.from_dict(__import__("yaml").safe_load(printed)).optim.lr == 0.25
    with pytest.raises(SystemExit) as exc:
        cli.main(["--dry-run", "--data", str(tmp_path / "missing")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dtrain: error: --data")
