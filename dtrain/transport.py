"""What carries the gradient sum: a pure decision from the launch's environment, made before ``dist.init``.

``DTRAIN_ALLREDUCE`` chooses: ``auto`` (the default), ``shm``, ``hier``, ``torch`` (Gloo) or ``horovod``.
``auto`` picks shared memory (``dtrain.shm``) when every rank is on this host (``spans_hosts``), and
the hierarchical allreduce (``dtrain.hier``: shared memory within each host, Gloo across hosts by
shards) when the ranks span hosts; both only when the run is not elastic (the world of an elastic run
changes under fixed groups), there is no GPU (NCCL through Horovod there) and neither Horovod's
autotuner nor its timeline was asked for (they must see the gradients). Gloo where shared memory is
not supported; Horovod otherwise. ``fallback`` says, for the log line at start, why a run does not
sum through shared memory (on one host, or hierarchically across hosts). The reasons, measured,
are in ``dtrain/dist.py``'s docstring and docs/performance.md. Kept apart from ``dist`` (which
imports Horovod) so that the choice is tested from environments alone.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from dtrain.errors import UserError

ENV = "DTRAIN_ALLREDUCE"
CHOICES = ("auto", "shm", "hier", "torch", "horovod")
NAMES = {"none": "nothing (one process)", "shm": "shared memory",
         "hier": "shared memory within each host and Gloo across hosts by shards (hierarchical)",
         "torch": "torch.distributed Gloo", "horovod": "Horovod"}


def launched_by_horovodrun(env: Mapping[str, str] = os.environ) -> bool:
    return "HOROVOD_RANK" in env or env.get("HOROVOD_ELASTIC") == "1"


def spans_hosts(env: Mapping[str, str] = os.environ) -> bool:
    """Whether the ranks run on more than one host, alike on every rank. Not ``HOROVOD_CROSS_SIZE``
    alone: with unequal hosts (2, 1 and 1 ranks) it is 1 for local rank 1 of the first host, which shares
    its index with no other host; a host holding fewer ranks than the world does not."""
    if not launched_by_horovodrun(env):
        return False
    if env.get("HOROVOD_ELASTIC") != "1" and "HOROVOD_SIZE" in env and "HOROVOD_LOCAL_SIZE" in env:
        return env["HOROVOD_SIZE"] != env["HOROVOD_LOCAL_SIZE"]
    return env.get("HOROVOD_CROSS_SIZE", "1") != "1"


def _asked(env: Mapping[str, str]) -> str:
    return env.get(ENV, "auto").strip().lower() or "auto"


def flag(env: Mapping[str, str], name: str) -> bool:
    """A Horovod-style on/off variable: anything but unset, empty or ``0`` is on."""
    return env.get(name, "0").strip() not in ("", "0")


def choose(env: Mapping[str, str], cuda: bool, shm_supported: bool) -> str:
    """``"shm"``, ``"hier"``, ``"torch"`` or ``"horovod"`` for a rank launched with ``env`` (see the module's
    docstring).

    Raises UserError for an unknown ``DTRAIN_ALLREDUCE``, or ``shm`` or ``hier`` where it cannot serve.
    """
    choice = _asked(env)
    if choice not in CHOICES:
        raise UserError(f"{ENV}={choice!r}: choose one of {', '.join(CHOICES)}")
    if choice == "horovod" or not launched_by_horovodrun(env) or env.get("HOROVOD_ELASTIC") == "1" or cuda:
        return "horovod"
    one_host = not spans_hosts(env)
    if choice == "shm":
        if not (one_host and shm_supported):
            raise UserError(f"{ENV}=shm needs every rank on one x86-64 Linux host; use {ENV}=hier, torch or auto")
        return "shm"
    if choice == "hier":
        if not shm_supported:
            raise UserError(f"{ENV}=hier needs x86-64 Linux hosts (shared memory within each); use {ENV}=torch or auto")
        return "shm" if one_host else "hier"  # on one host, the hierarchy is its shared memory alone
    if choice == "auto":
        if flag(env, "HOROVOD_AUTOTUNE") or env.get("HOROVOD_TIMELINE"):
            return "horovod"
        if not shm_supported:
            return "torch"
        return "shm" if one_host else "hier"
    return "torch"


def fallback(env: Mapping[str, str], cuda: bool, chosen: str) -> str | None:
    """Why the ranks do not sum through shared memory, on one host or hierarchically across hosts (for
    the log line at start), or None where they do (or run alone)."""
    if chosen in ("shm", "hier") or not launched_by_horovodrun(env):
        return None
    choice = _asked(env)
    if choice != "auto":
        return f"{ENV}={choice}"
    if env.get("HOROVOD_ELASTIC") == "1":
        return "an elastic run (its world changes; the groups within and across hosts are fixed)"
    if cuda:
        return "GPUs (NCCL through Horovod sums them)"
    if flag(env, "HOROVOD_AUTOTUNE") or env.get("HOROVOD_TIMELINE"):
        return "Horovod's autotuner or timeline (they must see the gradients)"
    return "shared memory is not supported on this host (x86-64 Linux only)"
