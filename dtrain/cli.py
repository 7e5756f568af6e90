"""Command line: every flag is derived from the config dataclasses (``dtrain.config``)."""

from __future__ import annotations

import argparse
import glob
import logging
import os
import socket
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from dtrain import supervise
from dtrain.config import Config, HostError, UserError, choices, coerce, field_type, load_yaml, section_fields
from dtrain.transport import spans_hosts

log = logging.getLogger(__name__)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line naming the problem and the fix, exit 2 (argparse's own also prints the usage).
        _fail(f"{message}; see {self.prog} --help")


def _fail(message: str, error: BaseException | None = None) -> NoReturn:
    # Under horovodrun every rank sees the same flags and the same results of rank 0's checks: rank 0
    # alone says so. A HostError is this rank's own (its host could not do something): this rank says
    # so, whichever it is, and names itself wherever that is not obvious (not rank 0 on one host).
    rank = os.environ.get("HOROVOD_RANK", "0")
    relayed = getattr(error, "dtrain_relayed", False)  # rank 0's error, raised here to stop (dist.run_on_main)
    if not relayed and (isinstance(error, HostError) or rank == "0"):
        where = ""
        if rank != "0" or spans_hosts(os.environ):
            where = f" (rank {rank} on host {socket.gethostname()})"
        print(f"dtrain: error: {message}{where}", file=sys.stderr)
    sys.exit(2)


def _fmt_default(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(map(str, value)) or "(none)"
    return "(none)" if value is None else str(value)


def build_parser() -> argparse.ArgumentParser:
    defaults = Config()
    parser = _Parser(
        prog="dtrain",
        description="Distributed data-parallel SGD: Dask streams partitions to Horovod ranks. "
        "Run as-is for one process, or under horovodrun -np N for N ranks.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--config", metavar="YAML", help="YAML file with sections as below; flags override it")
    parser.add_argument("--dry-run", action="store_true",
                        help="check the configuration (and that a local --data path exists), print it resolved, exit")
    groups: dict[str, argparse._ArgumentGroup] = {}
    for section, cls, f in section_fields():
        group = groups.get(section) or parser.add_argument_group(section, (cls.__doc__ or "").strip())
        groups[section] = group
        flag = "--" + f.name.replace("_", "-")
        default = getattr(getattr(defaults, section), f.name)
        tp, is_list = field_type(cls, f.name)
        help_text = f"{f.metadata['doc']} (default: {_fmt_default(default)})"
        if tp is bool and not is_list:
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            options = choices(cls, f.name)
            metavar = ("{" + ",".join(options) + "}" if options else
                       (tp.__name__.upper() + ",...") if is_list else tp.__name__.upper())
            group.add_argument(flag, dest=f.name, metavar=metavar, help=help_text)
    # ArgumentDefaultsHelpFormatter would print SUPPRESS; the defaults are already in each help line.
    parser.formatter_class = argparse.HelpFormatter
    return parser


def parse_config(argv: Sequence[str] | None = None) -> Config:
    """Flags over YAML over defaults, validated. Raises UserError on bad input."""
    args = vars(build_parser().parse_args(argv))
    args.pop("dry_run", None)
    raw: dict[str, dict[str, Any]] = load_yaml(args.pop("config")) if "config" in args else {}
    for section, cls, f in section_fields():
        if f.name in args:
            raw.setdefault(section, {})[f.name] = coerce(cls, f.name, args[f.name])
    return Config.from_dict(raw)


def _check_paths(config: Config) -> None:
    """What can be checked without a cluster: local paths exist."""
    data = config.data.data
    if data and "://" not in data and not glob.glob(data):
        raise UserError(f"--data: no such file or directory {data!r}; check the path")


def main(argv: Sequence[str] | None = None) -> None:
    supervise.supervise()  # under horovodrun: a parent that tells the other ranks how this one ended
    logging.basicConfig(
        level=os.environ.get("DTRAIN_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        config = parse_config(argv)
        if "--dry-run" in (sys.argv[1:] if argv is None else argv):
            _check_paths(config)
            print(config.to_yaml(), end="")
            return
        from dtrain.engine import run  # heavy imports (torch, dask) only after the flags are good

        run(config)
    except UserError as e:
        _fail(str(e), e)
    except Exception as e:
        from dtrain import dist
        from dtrain.storage import ClusterLost, StorageError

        if isinstance(e, StorageError):  # the work was saved elsewhere: the message says where
            print(f"dtrain: error: {e}", file=sys.stderr)
            sys.exit(1)
        if isinstance(e, ClusterLost):  # every rank stopped alike: rank 0 says so
            if dist.rank() == 0:
                print(f"dtrain: error: {e}", file=sys.stderr)
            sys.exit(1)
        if not dist.peer_failure(e):
            raise
        # Another rank failed: one line naming it, its host and how it ended (its parent recorded that,
        # dtrain/supervise.py); a traceback from every survivor would be noise.
        # No death recorded but a heartbeat stood still: a partition or a lost host; the line names it.
        found = supervise.peer_end(dist.rank(), dist.size())
        ended, unreachable = found if found is not None else (None, False)
        if ended is None:
            told = "see that rank's traceback above, if it printed one"
        elif unreachable:
            told = ended
        elif "killed by" in ended:
            told = f"{ended}; rerun the same command to resume from the last checkpoint"
        else:
            told = f"{ended}; see its traceback above"
        print(f"dtrain: error: rank {dist.rank()} stopped because another rank failed: {told}", file=sys.stderr)
        sys.exit(supervise.FOLLOWED)


if __name__ == "__main__":
    main()
