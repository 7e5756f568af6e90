"""Which rank prints a bad-input line (dtrain/cli.py ``_fail``), and whether it names its host."""

from __future__ import annotations

import socket

import pytest

from dtrain import cli
from dtrain.config import HostError, UserError

pytestmark = pytest.mark.unit


def fail(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], error: Exception,
         **env: str) -> str:
    for key in ("HOROVOD_RANK", "HOROVOD_CROSS_SIZE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(SystemExit) as stop:
        cli._fail(str(error), error)
    assert stop.value.code == 2
    return capsys.readouterr().err


def test_one_process_and_rank_0_on_one_host_keep_the_plain_line(monkeypatch, capsys):
    assert fail(monkeypatch, capsys, UserError("--x: bad; fix")) == "dtrain: error: --x: bad; fix\n"
    err = fail(monkeypatch, capsys, HostError("--x: bad; fix"), HOROVOD_RANK="0", HOROVOD_CROSS_SIZE="1")
    assert err == "dtrain: error: --x: bad; fix\n"


def test_input_every_rank_shares_is_printed_by_rank_0_alone(monkeypatch, capsys):
    assert fail(monkeypatch, capsys, UserError("--x: bad; fix"), HOROVOD_RANK="1") == ""


def test_a_host_error_is_printed_by_the_rank_that_has_it_with_its_host(monkeypatch, capsys):
    err = fail(monkeypatch, capsys, HostError("--scheduler: unreachable; fix"), HOROVOD_RANK="3",
               HOROVOD_CROSS_SIZE="2")
    assert err == f"dtrain: error: --scheduler: unreachable; fix (rank 3 on host {socket.gethostname()})\n"
    err = fail(monkeypatch, capsys, UserError("--x: bad; fix"), HOROVOD_RANK="0", HOROVOD_CROSS_SIZE="2")
    assert err.endswith(f"(rank 0 on host {socket.gethostname()})\n")


def test_rank_0s_error_relayed_to_the_others_is_not_printed_again(monkeypatch, capsys):
    error = HostError("--data: unreadable; fix")
    error.dtrain_relayed = True  # type: ignore[attr-defined]
    assert fail(monkeypatch, capsys, error, HOROVOD_RANK="1", HOROVOD_CROSS_SIZE="2") == ""
