"""The run directory: resolved config, statistics, metrics, final model and summary.

Rank 0 alone writes here (other ranks get a disabled RunDir whose writes do nothing), except the
optional audit log, which every rank writes to a file of its own.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from typing import IO, Any

import numpy as np
import torch

from dtrain.config import Config, UserError


class RunDir:
    def __init__(self, path: str, is_main: Callable[[], bool] = lambda: True, audit_dir: str | None = None,
                 audit_name: str = "rank-0"):
        self.path = path
        self._is_main = is_main  # asked at each write: rank 0 can change in elastic runs
        self.checkpoints = os.path.join(path, "checkpoints")
        self._metrics: IO[str] | None = None
        self._audit: IO[str] | None = None
        self._tensorboard: Any = None  # a SummaryWriter once tried and available, False if not
        if self.enabled:
            try:
                os.makedirs(path, exist_ok=True)
            except OSError as e:
                raise UserError(f"--run-dir: cannot create {path!r} ({e.strerror}); choose a writable path") from None
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

    def metrics(self, record: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        if self._metrics is None:
            self._metrics = open(os.path.join(self.path, "metrics.jsonl"), "a")  # noqa: SIM115
        self._metrics.write(json.dumps(record) + "\n")
        self._metrics.flush()
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
        if self.enabled:
            tmp = os.path.join(self.path, f".{name}.tmp")
            torch.save(dict(state), tmp)
            os.replace(tmp, os.path.join(self.path, name))

    def close(self) -> None:
        for f in (self._metrics, self._audit):
            if f is not None:
                f.close()
        if self._tensorboard:
            self._tensorboard.close()
