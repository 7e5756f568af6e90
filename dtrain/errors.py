"""The errors a user sees as one line (``dtrain: error: --flag: problem; fix``, exit status 2).

Every problem with the user's input is a :class:`UserError` whose message starts with the flag it is
about and ends with the fix; ``dtrain/cli.py`` prints it without a traceback. Subclasses say where it
was found: :class:`ConfigError` by a config dataclass's validation, :class:`DataError` by a Dask worker
reading the data (it pickles across Dask and arrives on the rank as the same exception).
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input: reported as one line, exit status 2, no traceback."""


class HostError(UserError):
    """Bad input that shows on some hosts only (an address one host cannot reach): the rank that has
    it reports it, with its host name, where other bad input is reported by rank 0 alone."""


class ConfigError(UserError):
    """An invalid configuration value; ``flag`` is the command-line spelling of the field."""

    def __init__(self, name: str, message: str):
        self.flag = "--" + name.replace("_", "-")
        super().__init__(f"{self.flag}: {message}")


class DataError(UserError):
    """Bad data found by a worker; pickles across Dask so the rank can report it as one line."""


def first_line(e: BaseException) -> str:
    """An exception as one short line: its type and the first line of its message."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__
