"""Sampling, the thread-group collective, and the chat template sandbox."""

from __future__ import annotations

import threading

import pytest
import torch

from edgemesh.collective.inproc import make_thread_group
from edgemesh.errors import ConfigError
from edgemesh.llm.sampling import Sampler, SamplingParams
from edgemesh.llm.tokenizer import ChatTokenizer

pytestmark = pytest.mark.unit


def test_greedy_and_seeded_sampling() -> None:
    logits = torch.tensor([0.1, 3.0, 2.9, -1.0])
    assert Sampler(SamplingParams())(logits) == 1
    p = SamplingParams(temperature=1.0, seed=42)
    a = [Sampler(p)(logits) for _ in range(1)] + [Sampler(p)(logits)]
    assert a[0] == a[1]  # same seed, same choice
    s = Sampler(SamplingParams(temperature=1.0, top_k=2, seed=1))
    assert {s(logits) for _ in range(200)} == {1, 2}
    s = Sampler(SamplingParams(temperature=1.0, top_p=0.5, seed=1))
    assert {s(logits) for _ in range(100)} == {1}  # token 1 alone holds > 50 % of the mass
    with pytest.raises(ConfigError):
        SamplingParams(top_p=0.0)


def _run(world: int, fn) -> list:  # type: ignore[no-untyped-def]
    group = make_thread_group(world, timeout=10)
    out: list = [None] * world

    def body(r: int) -> None:
        out[r] = fn(group[r])

    threads = [threading.Thread(target=body, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def test_thread_group_allreduce_is_rank_ordered_and_identical() -> None:
    vals = [torch.tensor([1e8, 1.0, -1e8], dtype=torch.float32) * (r + 1) + r for r in range(4)]
    got = _run(4, lambda c: c.allreduce_sum(vals[c.rank]))
    want = vals[0].clone()
    for v in vals[1:]:
        want += v
    assert all(torch.equal(g, want) for g in got)
    metas = _run(3, lambda c: c.broadcast_meta({"op": "x", "r": c.rank} if c.rank == 0 else None))
    assert metas == [{"op": "x", "r": 0}] * 3
    bc = _run(3, lambda c: c.broadcast(torch.arange(3.0) if c.rank == 0 else None))
    assert all(torch.equal(b, torch.arange(3.0)) for b in bc)


def test_thread_group_close_wakes_waiters() -> None:
    group = make_thread_group(2, timeout=30)
    errors: list[BaseException] = []

    def waiter() -> None:
        try:
            group[1].allreduce_sum(torch.ones(1))
        except threading.BrokenBarrierError as exc:
            errors.append(exc)

    t = threading.Thread(target=waiter)
    t.start()
    group[0].close()
    t.join(timeout=30)  # woken at once by close(); the cap only ends a hang
    assert not t.is_alive() and len(errors) == 1


def _tiny_tokenizer(template: str) -> ChatTokenizer:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"<unk>": 0, "hi": 1, "<eos>": 2}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return ChatTokenizer(tok, {"chat_template": template, "eos_token": "<eos>"})


def test_chat_template_renders_and_is_sandboxed() -> None:
    tok = _tiny_tokenizer("{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
                          "{% if add_generation_prompt %}[assistant]{% endif %}{{ eos_token }}")
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "[user]hi[assistant]<eos>"
    assert tok.stop_ids() == {2}
    evil = _tiny_tokenizer("{{ ''.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(Exception, match="unsafe|attribute"):
        evil.apply_chat_template([])
    with pytest.raises(ConfigError, match="chat template: no system"):
        _tiny_tokenizer("{{ raise_exception('no system') }}").apply_chat_template([])
