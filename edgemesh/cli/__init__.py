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


@app.callback()
def _root() -> None:
    # A group even when a command line registered one command only (see _register): typer would
    # otherwise run that lone command without its name.
    pass


# Which modules register each top-level command. A command line imports only its own modules:
# start-up time counts on small devices (`edgemesh join` is part of the measured join time).
_MODULES: dict[str, tuple[str, ...]] = {
    **{c: ("node",) for c in ("init", "join", "start", "stop", "leave", "remove", "token", "status", "discover")},
    "cluster": ("cluster",),
    "model": ("model",), "plan": ("model",),
    **{c: ("serve",) for c in ("launch", "generate", "ask", "classify")},
    "testbed": ("testbed",),
    "swarm": ("swarm",),
    "vit": ("vit",),
    "bench": ("bench", "bench_rpc", "bench_allreduce", "bench_generate", "bench_join", "bench_swarm", "bench_window",
              "bench_vit", "bench_anchors"),
}
_ALL = ("node", "cluster", "bench", "bench_rpc", "bench_allreduce", "bench_generate", "bench_join", "bench_swarm",
        "bench_window", "bench_vit", "bench_anchors", "testbed", "model", "serve", "swarm", "vit")


def _register(command: str | None = None) -> None:
    """Import the modules whose commands are needed (every one when ``command`` is None or
    unknown, e.g. for the top-level --help); importing registers their commands on `app`."""
    import importlib

    for name in _MODULES.get(command or "", _ALL):
        importlib.import_module(f"edgemesh.cli.{name}")


def main() -> None:
    """Console entry point: user mistakes become one line on stderr and a non-zero exit code."""
    debug = "--debug" in sys.argv or os.environ.get("EDGEMESH_DEBUG") == "1"
    if "--debug" in sys.argv:
        sys.argv.remove("--debug")
    _register(sys.argv[1] if len(sys.argv) > 1 else None)
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
