"""The `edgemesh` command line: parsing and printing only; logic lives in the layers below."""

from __future__ import annotations

import os
import sys

import typer

from edgemesh.errors import EdgemeshError

app = typer.Typer(
    name="edgemesh",
    help="Turn a handful of devices into one cluster that serves models none of them could serve alone.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _register() -> None:
    # Each sub-app lives in its own module; importing registers its commands on `app`.
    from edgemesh.cli import node  # noqa: F401  (init, join, start, stop, leave, token, status, discover)
    from edgemesh.cli import cluster  # noqa: F401  (cluster up/down/status)
    from edgemesh.cli import bench  # noqa: F401  (bench …)
    from edgemesh.cli import bench_rpc  # noqa: F401  (bench rpc)
    from edgemesh.cli import bench_allreduce  # noqa: F401  (bench allreduce)
    from edgemesh.cli import bench_generate  # noqa: F401  (bench generate)
    from edgemesh.cli import bench_join  # noqa: F401  (bench join)
    from edgemesh.cli import testbed  # noqa: F401  (testbed …)
    from edgemesh.cli import model  # noqa: F401  (model …, plan)
    from edgemesh.cli import serve  # noqa: F401  (launch, generate)


def main() -> None:
    """Console entry point: user mistakes become one line on stderr and a non-zero exit code."""
    debug = "--debug" in sys.argv or os.environ.get("EDGEMESH_DEBUG") == "1"
    if "--debug" in sys.argv:
        sys.argv.remove("--debug")
    _register()
    try:
        app(standalone_mode=False)
    except EdgemeshError as exc:
        if debug:
            raise
        print(f"edgemesh: error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print("edgemesh: interrupted", file=sys.stderr)
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as exc:  # click usage errors and friends
        for mod in _click_modules():
            if isinstance(exc, getattr(mod, "Abort", ())):
                print("edgemesh: aborted", file=sys.stderr)
                sys.exit(130)
            if isinstance(exc, getattr(mod, "ClickException", ())):
                exc.show()
                sys.exit(exc.exit_code)
            if isinstance(exc, getattr(mod, "Exit", ())):
                sys.exit(exc.exit_code)
        raise


def _click_modules() -> list:  # type: ignore[type-arg]
    """Exception modules of click: typer ≥ 0.29 vendors its own copy beside the real one."""
    mods = []
    for name in ("typer._click.exceptions", "click.exceptions"):
        try:
            mods.append(__import__(name, fromlist=["ClickException"]))
        except ImportError:
            pass
    return mods
