"""What carries the gradient sum: a pure decision from the launch's environment, made before ``dist.init``.

``DTRAIN_ALLREDUCE`` chooses: ``auto`` (the default), ``shm``, ``torch`` (Gloo, also on several hosts) or
``horovod``. ``auto`` picks shared memory (``dtrain.shm``) when every rank is on this host (horovodrun's
``HOROVOD_CROSS_SIZE`` is 1), the run is not elastic, there is no GPU (NCCL through Horovod there) and
neither Horovod's autotuner nor its timeline was asked for (they must see the gradients); Gloo where
shared memory is not supported; Horovod otherwise. The reasons, measured, are in ``dtrain/dist.py``'s
docstring and docs/performance.md. Kept apart from ``dist`` (which imports Horovod) so that the choice is
tested from environments alone.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from dtrain.errors import UserError

ENV = "DTRAIN_ALLREDUCE"
CHOICES = ("auto", "shm", "torch", "horovod")
NAMES = {"none": "nothing (one process)", "shm": "shared memory", "torch": "torch.distributed Gloo",
         "horovod": "Horovod"}


def launched_by_horovodrun(env: Mapping[str, str] = os.environ) -> bool:
    return "HOROVOD_RANK" in env or env.get("HOROVOD_ELASTIC") == "1"


def flag(env: Mapping[str, str], name: str) -> bool:
    """A Horovod-style on/off variable: anything but unset, empty or ``0`` is on."""
    return env.get(name, "0").strip() not in ("", "0")


def choose(env: Mapping[str, str], cuda: bool, shm_supported: bool) -> str:
    """``"shm"``, ``"torch"`` or ``"horovod"`` for a rank launched with ``env`` (see the module's docstring).

    Raises UserError for an unknown ``DTRAIN_ALLREDUCE`` or ``shm`` where it cannot serve.
    """
    choice = env.get(ENV, "auto").strip().lower() or "auto"
    if choice not in CHOICES:
        raise UserError(f"{ENV}={choice!r}: choose one of {', '.join(CHOICES)}")
    if choice == "horovod" or not launched_by_horovodrun(env) or env.get("HOROVOD_ELASTIC") == "1" or cuda:
        return "horovod"
    one_host = env.get("HOROVOD_CROSS_SIZE", "") == "1"
    if choice == "shm":
        if not (one_host and shm_supported):
            raise UserError(f"{ENV}=shm needs every rank on one x86-64 Linux host; use {ENV}=torch or auto")
        return "shm"
    if choice == "auto":
        if flag(env, "HOROVOD_AUTOTUNE") or env.get("HOROVOD_TIMELINE") or not one_host:
            return "horovod"
        return "shm" if shm_supported else "torch"
    return "torch"
