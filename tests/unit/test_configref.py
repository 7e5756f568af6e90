"""docs/config.md is generated from the config dataclasses (dtrain/tools/configref.py) and kept in step with them."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from dtrain.config import Config, TrainConfig, doc, section_fields
from dtrain.tools import configref

pytestmark = pytest.mark.unit


def _with_extra_field(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pretend a new field ``train.new_knob`` was added to the code without regenerating the docs."""
    extended = dataclasses.make_dataclass(
        "TrainConfig", [("new_knob", int, doc(7, "a knob added after the docs were generated"))], bases=(TrainConfig,)
    )
    extended.__doc__ = TrainConfig.__doc__
    extra = next(f for f in dataclasses.fields(extended) if f.name == "new_knob")
    original = section_fields()
    monkeypatch.setattr(configref, "section_fields", lambda: [*original, ("train", extended, extra)])


def test_committed_reference_is_current() -> None:
    assert configref.DOC_PATH.read_text() == configref.render(), (
        "docs/config.md is out of date: run python -m dtrain.configref"
    )
    assert configref.check() is None


def test_every_field_has_a_row_with_its_flag_key_default_and_doc() -> None:
    text = configref.render()
    defaults = Config()
    for section, _cls, f in section_fields():
        rows = [line for line in text.splitlines() if f"| `{section}.{f.name}` |" in line]
        assert len(rows) == 1, f"{section}.{f.name}"
        cells = [c.strip() for c in rows[0].strip("|").split(" | ")]
        assert cells[0].startswith(f"`--{f.name.replace('_', '-')}`")
        assert cells[4] == configref._prose(f.metadata["doc"])
        default = getattr(getattr(defaults, section), f.name)
        if default is None:
            assert cells[3] == "(none)"
        elif isinstance(default, list) and default:
            assert cells[3] == f"`{','.join(map(str, default))}`"
    # One table per section, in the order of Config's fields.
    headings = [line[3:] for line in text.splitlines() if line.startswith("## ")]
    assert headings == [f.name for f in dataclasses.fields(Config)]


def test_specific_rows() -> None:
    text = configref.render()
    assert ("| `--shuffle` / `--no-shuffle` | `data.shuffle` | bool | `true` |" in text)
    assert "| `--hidden` | `model.hidden` | list of int (comma-separated) | `128,128` |" in text
    assert "| `--scheduler` | `cluster.scheduler` | str or none | (none) |" in text
    assert "runs/&lt;timestamp&gt;" in text  # not swallowed as an HTML tag
    assert "| `--optimizer` | `optim.optimizer` | one of `sgd`, `adam`, `adamw`, `adagrad` | `adamw` |" in text


def test_a_new_field_without_regenerating_is_detected(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    committed = configref.DOC_PATH.read_text()
    _with_extra_field(monkeypatch)
    rendered = configref.render()
    assert rendered != committed
    assert "| `--new-knob` | `train.new_knob` | int | `7` | a knob added after the docs were generated |" in rendered
    problem = configref.check()
    assert problem is not None and "out of date" in problem
    with pytest.raises(SystemExit) as exc:
        configref.main(["--check"])
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "python -m dtrain.configref" in err

    # Regenerating (into a copy) makes the check pass again.
    copy = tmp_path / "config.md"
    copy.write_text(committed)
    configref.main(["--path", str(copy)])
    assert copy.read_text() == rendered
    configref.main(["--check", "--path", str(copy)])  # no SystemExit


def test_check_reports_a_missing_file(tmp_path: Path) -> None:
    problem = configref.check(tmp_path / "nope.md")
    assert problem is not None and "does not exist" in problem
