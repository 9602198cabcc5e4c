"""Start a command in a device: ``python -m edgemesh.testbed.enter --netns NS --cgroup DIR ... -- CMD``.

It moves itself into each cgroup directory given (writing its pid to ``cgroup.procs``), into
the device's network namespace, and then execs the command, so the command and all its
children are capped and isolated from their first instruction. Not ``ip netns exec``: that
remounts /sys, which hides /sys/fs/cgroup from the daemon that wants to report its caps.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from edgemesh.testbed import netns


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--netns", help="network namespace to enter (name under /run/netns)")
    parser.add_argument("--cgroup", action="append", default=[], help="cgroup directory to join")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given")
    for group in args.cgroup:
        (Path(group) / "cgroup.procs").write_text(str(os.getpid()))
    if args.netns:
        netns.enter(args.netns)
    try:
        os.execvp(command[0], command)
    except FileNotFoundError:
        print(f"edgemesh testbed: command not found: {command[0]}", file=sys.stderr)
        sys.exit(127)


if __name__ == "__main__":
    main()
