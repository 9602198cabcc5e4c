"""CLI: `edgemesh bench swarm` — BT swarm vs majority vote vs best single member on a question set."""

from __future__ import annotations

from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from edgemesh.cli.bench import bench_app
from edgemesh.cli.output import json_option, table_console, write_json
from edgemesh.errors import ConfigError


@bench_app.command("swarm")
def bench_swarm(
    dataset: str = typer.Option("mmlu", "--dataset", help="Question set (installed offline): mmlu."),
    nodes: int = typer.Option(7, "--nodes", help="Honest members (answer accuracies spread over --acc-low..--acc-high)."),
    simulated: bool = typer.Option(False, "--simulated", help="Simulated members (seeded; see --acc-low … --distractor)."),
    questions: int = typer.Option(500, "--questions", help="Questions drawn (seeded) from the set."),
    adversaries: int = typer.Option(2, "--adversaries", help="Colluding members added for the adversarial run."),
    seed: int = typer.Option(0, "--seed", help="Seed of the question draw and of every simulated choice."),
    acc_low: float = typer.Option(0.35, "--acc-low"),
    acc_high: float = typer.Option(0.75, "--acc-high"),
    judge_gap: float = typer.Option(0.2, "--judge-gap", help="How much better a member judges than it answers."),
    injection_fooled: float = typer.Option(0.3, "--injection-fooled", help="P(an honest judge obeys an injected instruction)."),
    answer_filter: bool = typer.Option(True, "--filter/--no-filter", help="Run the simulated GOOD/BAD screen before judging (recall 0.9, 2 % false positives)."),
    distractor: float = typer.Option(0.0, "--distractor", help="P(a wrong answer is the question's shared distractor): correlated mistakes."),
    base_url: Optional[str] = typer.Option(None, "--base-url", help="Real members instead: an OpenAI-compatible endpoint (e.g. http://127.0.0.1:8000/v1); API key from EDGEMESH_SWARM_API_KEY or OPENAI_API_KEY."),
    model: Optional[str] = typer.Option(None, "--model", help="Model name at --base-url."),
    json_path: Optional[str] = json_option("the results"),
) -> None:
    """Accuracy of the reputation-weighted Bradley–Terry swarm, majority vote and the best single
    member, then the same with colluding adversaries added."""
    from edgemesh.bench.swarm import SwarmBenchConfig, run_bench

    if base_url:
        _real(dataset, nodes, questions, seed, base_url, model, json_path)
        return
    if not simulated:
        raise ConfigError("choose the members: --simulated, or --base-url URL --model NAME for an "
                          "OpenAI-compatible endpoint (members over the mesh are not wired yet)")
    try:
        cfg = SwarmBenchConfig(dataset=dataset, nodes=nodes, questions=questions, adversaries=adversaries, seed=seed,
                               acc_low=acc_low, acc_high=acc_high, judge_gap=judge_gap,
                               injection_fooled=injection_fooled, answer_filter=answer_filter, distractor=distractor)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    console = Console(stderr=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as bar:
        tasks: dict[str, int] = {}

        def progress(label: str, done: int, total: int) -> None:
            if label not in tasks:
                tasks[label] = bar.add_task(f"{label} swarm", total=total)
            bar.update(tasks[label], completed=done)

        r = run_bench(cfg, progress)
    t = Table(title=f"swarm on {r['dataset']}: {r['questions']} questions, {r['nodes']} members "
                    f"(+{r['adversaries']} colluders), seed {r['seed']}, simulated")
    for col in ("", "honest", f"+{r['adversaries']} colluders"):
        t.add_column(col)
    pct = lambda x: f"{100 * x:.1f} %"  # noqa: E731
    t.add_row("BT swarm (grouped by option)", pct(r["acc_swarm"]), pct(r["acc_swarm_adversarial"]))
    t.add_row("BT swarm (top answer)", pct(r["acc_swarm_top_answer"]), pct(r["acc_swarm_top_answer_adversarial"]))
    t.add_row("majority vote", pct(r["acc_majority"]), pct(r["acc_majority_adversarial"]))
    t.add_row(f"best single member ({r['best_single_member']})", pct(r["acc_best_single"]), "")
    table_console(json_path).print(t)
    if r["adversaries"]:
        first, after = r.get("adversaries_below_honest_first"), r.get("adversaries_below_honest_after")
        table_console(json_path).print("colluders' reputation below every honest member's: "
                        + (f"first after query {first}, in {100 * r['adversaries_below_honest_fraction']:.0f} % of "
                           f"queries, for good from query {after}" if first else "never"))
    write_json(json_path, r, note=console.print)


def _real(dataset: str, nodes: int, questions: int, seed: int, base_url: str, model: Optional[str],
          json_path: Optional[str]) -> None:
    """N members on one OpenAI-compatible endpoint; their sampling temperatures spread over 0–1 so
    they do not all give the same answer."""
    import asyncio
    import os

    from edgemesh.bench.swarm import run_members
    from edgemesh.runtime.swarm_openai import OpenAIBackendConfig, OpenAIMember
    from edgemesh.swarm.datasets import load_questions
    from edgemesh.swarm.round import RoundConfig

    if not model:
        raise ConfigError("--base-url needs --model NAME")
    if nodes < 3:
        raise ConfigError("the swarm needs at least 3 members (a judge must not judge its own answer)")
    key = os.environ.get("EDGEMESH_SWARM_API_KEY") or os.environ.get("OPENAI_API_KEY", "")
    qs = load_questions(dataset, questions, seed)
    members = [OpenAIMember(f"m{k}", OpenAIBackendConfig(base_url.rstrip("/"), model, key, answer_max_tokens=24,
                                                          judge_max_tokens=6, temperature=k / max(1, nodes - 1)))
               for k in range(nodes)]
    console = Console(stderr=True)

    async def go() -> dict:
        try:
            with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                          console=console, transient=True) as bar:
                task = bar.add_task("questions", total=len(qs))
                # Members may share one server that answers one request at a time: long deadlines.
                return await run_members(qs, members, seed, lambda _l, d, _t: bar.update(task, completed=d),
                                         RoundConfig(commit_timeout=600, reveal_timeout=30, judge_timeout=600))
        finally:
            for m in members:
                await m.aclose()

    r = asyncio.run(go())
    r.update({"dataset": dataset, "seed": seed, "base_url": base_url, "model": model})
    t = Table(title=f"swarm on {dataset}: {r['questions']} questions, {nodes} members on {model} at {base_url}")
    t.add_column("")
    t.add_column("accuracy")
    for label, key_ in (("BT swarm (grouped by option)", "acc_swarm"), ("BT swarm (top answer)", "acc_swarm_top_answer"),
                        ("majority vote", "acc_majority")):
        t.add_row(label, f"{100 * r[key_]:.1f} %")
    for m, a in r["acc_members"].items():
        t.add_row(f"member {m} alone", f"{100 * a:.1f} %")
    table_console(json_path).print(t)
    write_json(json_path, r, note=console.print)
