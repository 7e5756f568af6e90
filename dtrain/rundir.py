"""The run directory: resolved config, statistics, metrics, final model and summary.

Rank 0 alone writes here (other ranks get a disabled RunDir whose writes do nothing), except the
optional audit log, which every rank writes to a file of its own.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
import os
import tempfile
from collections.abc import Callable, Mapping
from typing import IO, Any

import numpy as np
import torch

from dtrain.config import Config
from dtrain.storage import StorageError, reason

log = logging.getLogger(__name__)


class RunDir:
    def __init__(self, path: str, is_main: Callable[[], bool] = lambda: True, audit_dir: str | None = None,
                 audit_name: str = "rank-0"):
        self.path = path
        self._is_main = is_main  # asked at each write: rank 0 can change in elastic runs
        self.checkpoints = os.path.join(path, "checkpoints")
        self._metrics: IO[str] | None = None
        self._audit: IO[str] | None = None
        self._tensorboard: Any = None  # a SummaryWriter once tried and available, False if not
        self._rescue: str | None = None  # where the final model and summary went when the run dir failed
        self._metrics_failed = False
        if self.enabled:
            # Not writable: Coordinator.preflight says so on every rank (raising here would stop rank 0
            # alone and leave the others waiting).
            with contextlib.suppress(OSError):
                os.makedirs(path, exist_ok=True)
        if audit_dir:
            os.makedirs(audit_dir, exist_ok=True)
            self._audit = open(os.path.join(audit_dir, f"{audit_name}.jsonl"), "a")  # noqa: SIM115

    @property
    def enabled(self) -> bool:
        return self._is_main()

    @property
    def audit(self) -> bool:
        return self._audit is not None

    def _atomic_write(self, name: str, text: str) -> None:
        tmp = os.path.join(self.path, f".{name}.tmp")
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, os.path.join(self.path, name))

    def write_config(self, cfg: Config) -> None:
        if self.enabled:
            self._atomic_write("config.yaml", cfg.to_yaml())

    def write_json(self, name: str, obj: Mapping[str, Any]) -> None:
        if self.enabled:
            self._atomic_write(name, json.dumps(obj, indent=1, default=float) + "\n")

    def write_result(self, name: str, write: Callable[[str], None]) -> None:
        """Write a result the run must not lose (model, summary) with ``write(path)``: into the run
        directory, or, when that fails (full, read-only), into a rescue directory that
        :meth:`close` names in a StorageError."""
        if not self.enabled:
            return
        if self._rescue is None:
            tmp = os.path.join(self.path, f".{name}.tmp")
            try:
                write(tmp)
                os.replace(tmp, os.path.join(self.path, name))
                return
            except OSError as e:
                with contextlib.suppress(OSError):
                    os.remove(tmp)
                self._rescue = tempfile.mkdtemp(prefix=f"dtrain-{os.path.basename(os.path.abspath(self.path))}-")
                self._rescue_reason = reason(e)
                log.warning("cannot write %s in %s (%s); writing it to %s instead", name, self.path,
                            self._rescue_reason, self._rescue)
        write(os.path.join(self._rescue, name))

    def metrics(self, record: Mapping[str, Any]) -> None:
        if not self.enabled or self._metrics_failed:
            return
        try:
            if self._metrics is None:
                self._metrics = open(os.path.join(self.path, "metrics.jsonl"), "a")  # noqa: SIM115
            self._metrics.write(json.dumps(record) + "\n")
            self._metrics.flush()
        except OSError as e:  # a full disk ends the metrics, not the training
            self._metrics_failed = True
            log.warning("cannot write metrics.jsonl in %s (%s); training goes on without metrics lines",
                        self.path, reason(e))
            return
        tb = self._tb()
        if tb:
            for key, value in record.items():
                if key != "step" and isinstance(value, int | float):
                    tb.add_scalar(key, value, record["step"])

    def _tb(self) -> Any:
        """TensorBoard event files in the run dir, when tensorboard is installed."""
        if self._tensorboard is None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tensorboard = SummaryWriter(log_dir=os.path.join(self.path, "tensorboard"))
            except ImportError:
                self._tensorboard = False
        return self._tensorboard

    def audit_rows(self, rank: int, epoch: int, step: int, row_ids: np.ndarray) -> None:
        assert self._audit is not None
        self._audit.write(json.dumps({"rank": rank, "epoch": epoch, "step": step, "rows": row_ids.tolist()}) + "\n")
        self._audit.flush()  # a killed rank's last steps must still be on record

    def save_model(self, state: Mapping[str, torch.Tensor], name: str = "model.pt") -> None:
        # Serialised in memory first: torch.save into a full file system fails with a RuntimeError of
        # its zip writer, where a plain write says OSError (ENOSPC).
        buf = io.BytesIO()
        torch.save(dict(state), buf)
        self.write_result(name, functools.partial(_write_bytes, data=buf.getvalue()))

    def save_summary(self, summary: Mapping[str, Any]) -> None:
        text = json.dumps(summary, indent=1, default=float) + "\n"
        self.write_result("summary.json", functools.partial(_write_bytes, data=text.encode()))

    def close(self) -> None:
        for f in (self._metrics, self._audit):
            if f is not None:
                with contextlib.suppress(OSError):  # what could not be written was warned about
                    f.close()
        if self._tensorboard:
            with contextlib.suppress(OSError):
                self._tensorboard.close()
        if self._rescue is not None:
            raise StorageError(f"--run-dir: could not write {self.path!r} ({self._rescue_reason}); the model "
                               f"and summary are in {self._rescue}; move them where they belong, and free "
                               "space or choose another --run-dir for the next run")


def _write_bytes(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())  # the result, not the page cache, before the rename makes it the one
