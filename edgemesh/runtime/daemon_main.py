"""Process entry of a daemon: `python -m edgemesh.runtime.daemon_main --state-dir …`.

Started by `edgemesh start/init/join` (in the foreground or detached). A startup failure is
written as one line to `daemon.error` in the state dir, so the parent can show it.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from edgemesh.config import load_mesh_config
from edgemesh.errors import EdgemeshError
from edgemesh.identity.statedir import StateDir
from edgemesh.runtime.daemon import NodeDaemon


def run_daemon(state: StateDir, host: str, port: int, advertise: str | None, mdns: bool) -> None:
    config = load_mesh_config(state.file(StateDir.CONFIG))
    if not mdns:
        from dataclasses import replace

        config = replace(config, mdns=False)
    try:
        state.file(StateDir.ERROR).unlink()
    except FileNotFoundError:
        pass
    try:
        asyncio.run(NodeDaemon(state, host, port, advertise, config).run())
    except EdgemeshError as exc:
        state.file(StateDir.ERROR).write_text(str(exc) + "\n")
        raise


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="edgemesh-daemon")
    p.add_argument("--state-dir", required=True, type=Path)
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=7700)
    p.add_argument("--advertise")
    p.add_argument("--no-mdns", action="store_true")
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        run_daemon(StateDir(args.state_dir), args.host, args.port, args.advertise, not args.no_mdns)
    except EdgemeshError as exc:
        logging.getLogger("edgemesh").error("%s", exc)
        sys.exit(2)


if __name__ == "__main__":
    main()
