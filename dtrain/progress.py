"""What a person watching a run sees: a live bar on a terminal, plain log lines otherwise.

Only rank 0 draws. On a TTY, a tqdm bar per epoch shows loss, samples/s and the ETA; when output goes
to a file or a pipe (CI, Kubernetes logs) there are no bar characters, just a log line at most every
``every_seconds``.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import IO, Any

log = logging.getLogger(__name__)


class Progress:
    def __init__(self, enabled: bool, every_seconds: float = 10.0, stream: IO[str] | None = None):
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.tty = enabled and self.stream.isatty()
        self.every = every_seconds
        self._bar: Any = None
        self._last_line = time.monotonic()
        self._epoch = -1
        self._total = 0

    def start_epoch(self, epoch: int, steps: int, done: int = 0) -> None:
        if not self.enabled:
            return
        self.close()
        self._epoch, self._total = epoch, steps
        if self.tty:
            from tqdm import tqdm

            # A terminal that reports no size (0x0: some ptys, `script`) would get an empty bar: tqdm
            # hides bars beyond the screen's 0 rows.
            try:
                size = os.get_terminal_size(self.stream.fileno())
                known = size.columns > 0 and size.lines > 0
            except (OSError, ValueError):
                known = False
            self._bar = tqdm(total=steps, initial=done, desc=f"epoch {epoch}", unit="step", file=self.stream,
                             dynamic_ncols=known, ncols=None if known else 100, nrows=None if known else 24,
                             leave=True)

    def update(self, step_in_epoch: int, loss: float, samples_per_sec: float) -> None:
        """Called after every step with the latest metrics (cheap when nothing is drawn)."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(step_in_epoch - self._bar.n)
            self._bar.set_postfix(loss=f"{loss:.4f}", samples_s=f"{samples_per_sec:,.0f}", refresh=False)
            return
        now = time.monotonic()
        if now - self._last_line >= self.every:
            self._last_line = now
            log.info("epoch %d step %d/%d loss %.4f %.0f samples/s", self._epoch, step_in_epoch, self._total,
                     loss, samples_per_sec)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
