"""CLI: `edgemesh swarm config` (this node's answering model) and `edgemesh swarm ask`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from edgemesh.cli import app
from edgemesh.cli.output import json_option, to_stdout, write_json
from edgemesh.cli.node import resolve_state

swarm_app = typer.Typer(help="Swarm inference: members answer, peers rank the answers, the best one wins.",
                        no_args_is_help=True)
app.add_typer(swarm_app, name="swarm")

StateOpt = typer.Option(None, "--state-dir", help="This node's state dir (default: this device's node).")


@swarm_app.command("config")
def config(
    base_url: str = typer.Option(..., "--base-url", help="An OpenAI-compatible API this node answers with, "
                                                          "e.g. its own `edgemesh launch` at http://127.0.0.1:8000/v1."),
    model: str = typer.Option(..., "--model", help="The model name at that API."),
    api_key_env: Optional[str] = typer.Option(None, "--api-key-env",
                                              help="Name of an environment variable of the daemon holding the key."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="EDGEMESH_SWARM_API_KEY",
                                          help="The backend's API key, kept in this node's settings file (mode 0600)."),
    state_dir: Optional[Path] = StateOpt,
) -> None:
    """Make this node a swarm member: it answers and judges with this backend (no restart needed)."""
    from edgemesh.runtime.swarm_openai import OpenAIBackendConfig

    conf = {"base_url": base_url.rstrip("/"), "model": model, **({"api_key_env": api_key_env} if api_key_env else {}),
            **({"api_key": api_key} if api_key else {})}
    OpenAIBackendConfig.from_mapping(conf, "--base-url/--model")  # a typo fails here, not in a round
    state = resolve_state(state_dir)
    settings = state.load_settings()
    settings["swarm"] = conf
    state.save_settings(settings)
    Console(stderr=True).print(f"this node answers swarm questions with {escape(model)} at {escape(conf['base_url'])}")


@swarm_app.command("ask")
def ask(
    question: str = typer.Argument(..., help="The question."),
    explain: bool = typer.Option(False, "--explain", help="Show every answer, the Bradley–Terry scores and who judged what."),
    json_path: Optional[str] = json_option("the whole result"),
    timeout: float = typer.Option(120.0, "--timeout", help="Seconds each phase (answering, judging) may take."),
    state_dir: Optional[Path] = StateOpt,
) -> None:
    """Ask every member; peers rank the answers pairwise; print the winning answer."""
    from edgemesh.runtime.control import control

    result = control(resolve_state(state_dir), "admin.swarm_ask", {"question": question, "timeout": timeout},
                     timeout=timeout * 3 + 30)
    write_json(json_path, result, note=Console(stderr=True).print)
    if to_stdout(json_path):
        return
    print(result.get("answer") or "")
    err = Console(stderr=True)
    winner = result.get("winner")
    err.print(f"winner: {escape(str(winner))} of {len(result.get('answers') or {})} answer(s); "
              f"left out: {len(result.get('left_out') or {})}")
    if not explain:
        return
    t = Table(title="answers (Bradley–Terry strength, Σ = number of answers)")
    for col in ("member", "strength", "reputation", "answer"):
        t.add_column(col)
    for m in result.get("ranking") or []:
        t.add_row(escape(m[:12]), f"{result['scores'][m]:.3f}", f"{(result.get('reputation') or {}).get(m, 0):.2f}",
                  escape((result["answers"].get(m) or "")[:80]))
    err.print(t)
    j = Table(title="judgments")
    for col in ("judge", "A", "B", "verdict"):
        j.add_column(col)
    for row in result.get("judgments") or []:
        j.add_row(*(escape(str(row.get(k, "")))[:12] for k in ("judge", "a", "b", "verdict")))
    err.print(j)
    for who, why in (result.get("left_out") or {}).items():
        err.print(f"left out {escape(who[:12])}: {escape(why)}")
