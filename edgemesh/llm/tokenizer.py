"""The model's own tokenizer (HF ``tokenizers``) and its chat template (sandboxed jinja2).

The template is rendered in jinja2's immutable sandbox, as transformers does: templates come
with model files, so they must not reach Python internals.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from edgemesh.errors import ConfigError
from edgemesh.weights.store import ModelEntry, verify_file


class ChatTokenizer:
    def __init__(self, tokenizer: Any, config: dict[str, Any] | None = None) -> None:
        self._tok = tokenizer
        cfg = config or {}
        self.chat_template: str | None = cfg.get("chat_template") or None
        self.bos_token: str | None = _token_text(cfg.get("bos_token"))
        self.eos_token: str | None = _token_text(cfg.get("eos_token"))
        self.add_bos: bool = bool(cfg.get("add_bos_token", False))
        self._template: Any = None

    @classmethod
    def from_files(cls, tokenizer_json: Path, tokenizer_config: Path | None = None) -> ChatTokenizer:
        from tokenizers import Tokenizer

        cfg = json.loads(Path(tokenizer_config).read_text()) if tokenizer_config and Path(tokenizer_config).is_file() else {}
        return cls(Tokenizer.from_file(str(tokenizer_json)), cfg)

    @classmethod
    def from_entry(cls, entry: ModelEntry) -> ChatTokenizer:
        if not entry.has("tokenizer.json"):
            raise ConfigError(f"model {entry.name!r} has no tokenizer (synthetic models take token ids only)")
        for key in ("tokenizer.json", "tokenizer_config.json"):
            if entry.has(key):
                verify_file(entry.path(key), entry.files[key])
        cfg = entry.path("tokenizer_config.json") if entry.has("tokenizer_config.json") else None
        return cls.from_files(entry.path("tokenizer.json"), cfg)

    # ---- ids ------------------------------------------------------------------------------

    def token_id(self, text: str | None) -> int | None:
        return None if text is None else self._tok.token_to_id(text)

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    def stop_ids(self, extra: Iterable[int] = ()) -> set[int]:
        """EOS plus, for chat models, the end-of-turn token."""
        ids = {i for i in (self.token_id(self.eos_token), self.token_id("<|im_end|>"), self.token_id("<|eot_id|>")) if i is not None}
        return ids | set(extra)

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        ids = list(self._tok.encode(text, add_special_tokens=False).ids)
        bos = self.token_id(self.bos_token)
        if add_special_tokens and self.add_bos and bos is not None and (not ids or ids[0] != bos):
            ids.insert(0, bos)
        return ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return str(self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens))

    # ---- chat -----------------------------------------------------------------------------

    def apply_chat_template(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            # No template: plain concatenation, so completion-style models still work.
            return "\n".join(str(m.get("content", "")) for m in messages) + "\n"
        if self._template is None:
            self._template = _compile(self.chat_template)
        return str(self._template.render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "", eos_token=self.eos_token or "",
        ))

    def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        # The template already writes any BOS it wants as text; special tokens in it are parsed.
        return list(self._tok.encode(self.apply_chat_template(messages), add_special_tokens=False).ids)


class StreamDecoder:
    """Turns a stream of ids into text pieces without splitting multi-byte characters."""

    def __init__(self, tokenizer: ChatTokenizer) -> None:
        self._tok = tokenizer
        self._ids: list[int] = []
        self._sent = 0

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        text = self._tok.decode(self._ids)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for its next byte
            return ""
        piece, self._sent = text[self._sent:], len(text)
        return piece


def _token_text(v: Any) -> str | None:
    if isinstance(v, dict):  # HF's AddedToken serialization
        return v.get("content")
    return v if isinstance(v, str) else None


def _compile(source: str) -> Any:
    from jinja2 import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise ConfigError(f"chat template: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except TemplateError as exc:
        raise ConfigError(f"chat template does not compile: {exc}") from None
