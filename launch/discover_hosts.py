#!/usr/bin/env python3
"""Horovod host discovery from a hosts file: print one ``host:slots`` line per host.

usage: discover_hosts.py [-h] [--slots N] [HOSTS_FILE]

HOSTS_FILE defaults to $DTRAIN_HOSTS_FILE. Each line names one host as ``host``, ``host:slots`` or
``host slots=N`` (the horovodrun/OpenMPI hostfile form); ``#`` starts a comment and blank lines are
skipped. Hosts without a slot count get --slots (default $DTRAIN_SLOTS, else 1).

As an elastic host-discovery script horovodrun calls it without arguments, so name the file in the
environment; editing the file while the job runs grows or shrinks the world:

    DTRAIN_HOSTS_FILE=hosts.txt horovodrun --min-np 2 --max-np 8 \\
        --host-discovery-script launch/discover_hosts.py --gloo python -m dtrain ...

Exit status: 0 with the hosts on stdout; 1 if the file cannot be read or a line is malformed.
Only the standard library is used, so any python3 can run it.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence


def parse_hosts(text: str, default_slots: int = 1) -> list[tuple[str, int]]:
    """``[(host, slots), ...]`` in file order from a hosts file's text. Raises ValueError on bad lines."""
    hosts: list[tuple[str, int]] = []
    seen: set[str] = set()
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        host, slots_text = parts[0], None
        if len(parts) == 2 and parts[1].startswith("slots="):
            slots_text = parts[1][len("slots=") :]
        elif len(parts) != 1:
            raise ValueError(f"line {lineno}: expected 'host', 'host:slots' or 'host slots=N', got {raw!r}")
        if ":" in host:
            if slots_text is not None:
                raise ValueError(f"line {lineno}: slots given twice in {raw!r}")
            host, slots_text = host.rsplit(":", 1)
        try:
            slots = default_slots if slots_text is None else int(slots_text)
        except ValueError:
            raise ValueError(f"line {lineno}: slots must be an integer in {raw!r}") from None
        if not host or slots < 1:
            raise ValueError(f"line {lineno}: need a host name and slots >= 1 in {raw!r}")
        if host in seen:
            raise ValueError(f"line {lineno}: host {host!r} listed twice")
        seen.add(host)
        hosts.append((host, slots))
    return hosts


def format_hosts(hosts: Sequence[tuple[str, int]]) -> str:
    """The discovery-script answer: ``host:slots`` lines."""
    return "".join(f"{host}:{slots}\n" for host, slots in hosts)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="discover_hosts.py",
        description=(__doc__ or "").split("\n\n")[0],
        epilog="\n\n".join((__doc__ or "").split("\n\n")[2:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("hosts_file", nargs="?", metavar="HOSTS_FILE",
                        default=os.environ.get("DTRAIN_HOSTS_FILE"),
                        help="hosts file, - for stdin (default: $DTRAIN_HOSTS_FILE)")
    parser.add_argument("--slots", type=int, default=int(os.environ.get("DTRAIN_SLOTS", "1")),
                        help="slots of hosts listed without a count (default: $DTRAIN_SLOTS or 1)")
    args = parser.parse_args(argv)
    if not args.hosts_file:
        parser.error("no hosts file: pass HOSTS_FILE or set DTRAIN_HOSTS_FILE")
    try:
        if args.hosts_file == "-":
            hosts = parse_hosts(sys.stdin.read(), args.slots)
        else:
            with open(args.hosts_file) as f:
                hosts = parse_hosts(f.read(), args.slots)
    except (OSError, ValueError) as e:
        print(f"discover_hosts.py: {args.hosts_file}: {e}", file=sys.stderr)
        return 1
    sys.stdout.write(format_hosts(hosts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
