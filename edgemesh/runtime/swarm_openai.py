"""A swarm member backed by any OpenAI-compatible chat endpoint (edgemesh's own API, llama.cpp's
server, vLLM, a hosted service): answers, judges and screens through /chat/completions.

Lives in runtime (it does HTTP); the consensus logic in ``edgemesh.swarm`` only sees the
``SwarmMember`` protocol.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping

import aiohttp

from edgemesh.errors import ConfigError, SwarmError
from edgemesh.swarm.prompts import answer_messages, judge_messages, parse_screen, screen_messages

ENV_PREFIX = "EDGEMESH_SWARM_"


@dataclass(frozen=True)
class OpenAIBackendConfig:
    base_url: str                 # e.g. http://127.0.0.1:8000/v1
    model: str
    api_key: str = ""             # sent as a bearer token when set; never logged
    answer_max_tokens: int = 96
    judge_max_tokens: int = 8
    temperature: float = 0.0
    timeout: float = 120.0        # per request, seconds

    def __post_init__(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise ConfigError(f"swarm backend base_url must start with http:// or https://, got {self.base_url!r}")
        if not self.model:
            raise ConfigError("swarm backend: a model name is required")
        if self.answer_max_tokens < 1 or self.judge_max_tokens < 1 or self.timeout <= 0:
            raise ConfigError("swarm backend: max tokens must be ≥ 1 and timeout > 0")

    def __repr__(self) -> str:  # keep the key out of logs and tracebacks
        return f"OpenAIBackendConfig(base_url={self.base_url!r}, model={self.model!r}, api_key={'***' if self.api_key else ''!r})"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> OpenAIBackendConfig:
        """EDGEMESH_SWARM_BASE_URL, EDGEMESH_SWARM_MODEL, EDGEMESH_SWARM_API_KEY (else OPENAI_API_KEY)."""
        e = os.environ if env is None else env
        url, model = e.get(ENV_PREFIX + "BASE_URL"), e.get(ENV_PREFIX + "MODEL")
        if not url or not model:
            raise ConfigError(f"set {ENV_PREFIX}BASE_URL and {ENV_PREFIX}MODEL for an OpenAI-compatible swarm backend")
        return cls(url.rstrip("/"), model, e.get(ENV_PREFIX + "API_KEY") or e.get("OPENAI_API_KEY", ""))

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], where: str) -> OpenAIBackendConfig:
        """From a TOML table; ``api_key_env`` names an environment variable holding the key, so
        config files need not contain secrets."""
        known = {"base_url", "model", "api_key", "api_key_env", "answer_max_tokens", "judge_max_tokens",
                 "temperature", "timeout"}
        for k in data:
            if k not in known:
                raise ConfigError(f"{where}: unknown key '{k}' (known: {', '.join(sorted(known))})")
        vals = dict(data)
        env_name = vals.pop("api_key_env", None)
        if env_name:
            vals["api_key"] = os.environ.get(str(env_name), "")
        try:
            return cls(**vals)
        except TypeError as exc:
            raise ConfigError(f"{where}: {exc}") from None


class OpenAIMember:
    """``SwarmMember`` over HTTP. One aiohttp session per member; ``aclose()`` releases it."""

    def __init__(self, member_id: str, config: OpenAIBackendConfig) -> None:
        self._id = member_id
        self.config = config
        self._session: aiohttp.ClientSession | None = None

    @property
    def id(self) -> str:
        return self._id

    async def answer(self, question: str) -> str:
        return await self.chat(answer_messages(question), self.config.answer_max_tokens)

    async def judge(self, question: str, answer_a: str, answer_b: str) -> str:
        return await self.chat(judge_messages(question, answer_a, answer_b), self.config.judge_max_tokens)

    async def screen(self, question: str, answer: str) -> bool:
        """The GOOD/BAD screen (usable as ``RoundConfig.answer_filter``)."""
        return parse_screen(await self.chat(screen_messages(question, answer), self.config.judge_max_tokens))

    async def chat(self, messages: list[dict[str, str]], max_tokens: int) -> str:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.config.timeout))
        headers = {"Content-Type": "application/json"}
        if self.config.api_key:
            headers["Authorization"] = f"Bearer {self.config.api_key}"
        body = {"model": self.config.model, "messages": messages, "max_tokens": max_tokens,
                "temperature": self.config.temperature}
        url = self.config.base_url.rstrip("/") + "/chat/completions"
        try:
            async with self._session.post(url, json=body, headers=headers) as resp:
                try:
                    data = await resp.json(content_type=None)
                except ValueError:
                    data = None
                if resp.status != 200:
                    err = data.get("error") if isinstance(data, dict) else None
                    msg = err.get("message") if isinstance(err, dict) else None
                    raise SwarmError(f"{self.config.model} at {self.config.base_url}: HTTP {resp.status}"
                                     + (f": {msg}" if msg else ""))
        except aiohttp.ClientError as exc:
            raise SwarmError(f"cannot reach the swarm backend at {self.config.base_url}: {exc}") from None
        try:
            content = data["choices"][0]["message"]["content"]  # type: ignore[index]
        except (KeyError, IndexError, TypeError):
            raise SwarmError(f"{self.config.base_url}: reply is not an OpenAI chat completion") from None
        return content if isinstance(content, str) else ""

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
