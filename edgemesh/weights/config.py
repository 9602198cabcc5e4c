"""The shape of a Llama-family model, read from (and written back to) HF ``config.json`` keys.

It lives in ``weights`` (below ``llm``) because the store, the slicer and the planner all need
the shape without needing the model math.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from edgemesh.errors import ConfigError


@dataclass(frozen=True)
class RopeScaling:
    """HF ``rope_scaling``: ``default``, ``linear`` (factor) or ``llama3`` (factor + band limits)."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    @classmethod
    def from_hf(cls, d: dict[str, Any] | None) -> RopeScaling:
        if not d:
            return cls()
        kind = str(d.get("rope_type", d.get("type", "default")))
        if kind not in ("default", "linear", "llama3"):
            raise ConfigError(f"unsupported rope_scaling type {kind!r} (supported: default, linear, llama3)")
        return cls(
            rope_type=kind,
            factor=float(d.get("factor", 1.0)),
            low_freq_factor=float(d.get("low_freq_factor", 1.0)),
            high_freq_factor=float(d.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(d.get("original_max_position_embeddings", 8192)),
        )

    def to_hf(self) -> dict[str, Any] | None:
        if self.rope_type == "default":
            return None
        if self.rope_type == "linear":
            return {"rope_type": "linear", "factor": self.factor}
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ModelConfig:
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    num_hidden_layers: int
    vocab_size: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 2048
    head_dim: int = 0  # 0 = hidden_size // num_attention_heads
    qkv_bias: bool = False  # Qwen2 and Llama attention_bias
    o_bias: bool = False  # Llama attention_bias only
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self) -> None:
        for name in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                     "num_hidden_layers", "vocab_size"):
            if int(getattr(self, name)) <= 0:
                raise ConfigError(f"model config: {name} must be positive, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"model config: num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim == 0:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError(
                    f"model config: hidden_size ({self.hidden_size}) is not divisible by "
                    f"num_attention_heads ({self.num_attention_heads}); give head_dim explicitly"
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.head_dim % 2:
            raise ConfigError(f"model config: head_dim must be even for RoPE, got {self.head_dim}")

    @property
    def group_size(self) -> int:
        """Query heads per KV head."""
        return self.num_attention_heads // self.num_key_value_heads

    def block_names(self) -> list[str]:
        """Blocks in execution order (ALGORITHMS §3): input, attn_0, mlp_0, …, output."""
        names = ["input"]
        for i in range(self.num_hidden_layers):
            names += [f"attn_{i}", f"mlp_{i}"]
        return names + ["output"]

    def num_parameters(self) -> int:
        h, f, v, d = self.hidden_size, self.intermediate_size, self.vocab_size, self.head_dim
        nq, nkv = self.num_attention_heads, self.num_key_value_heads
        attn = h + h * d * (nq + 2 * nkv) + nq * d * h
        attn += d * (nq + 2 * nkv) if self.qkv_bias else 0
        attn += h if self.o_bias else 0
        mlp = h + 3 * h * f + ((2 * f + h) if self.mlp_bias else 0)
        head = h + (0 if self.tie_word_embeddings else v * h)
        return v * h + self.num_hidden_layers * (attn + mlp) + head

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> ModelConfig:
        """Parse a HF ``config.json`` dict (Llama, Mistral, Qwen2, SmolLM)."""
        try:
            n_heads = int(d["num_attention_heads"])
            model_type = str(d.get("model_type", "llama"))
            attention_bias = bool(d.get("attention_bias", False))
            qwen2 = model_type == "qwen2"
            return cls(
                hidden_size=int(d["hidden_size"]),
                intermediate_size=int(d["intermediate_size"]),
                num_attention_heads=n_heads,
                num_key_value_heads=int(d.get("num_key_value_heads") or n_heads),
                num_hidden_layers=int(d["num_hidden_layers"]),
                vocab_size=int(d["vocab_size"]),
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
                rope_theta=float(d.get("rope_theta", 10000.0)),
                rope_scaling=RopeScaling.from_hf(d.get("rope_scaling")),
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
                head_dim=int(d.get("head_dim") or 0),
                qkv_bias=qwen2 or attention_bias,
                o_bias=attention_bias and not qwen2,
                mlp_bias=bool(d.get("mlp_bias", False)),
                bos_token_id=d.get("bos_token_id"),
                eos_token_id=d.get("eos_token_id"),
            )
        except KeyError as exc:
            raise ConfigError(f"model config: missing key {exc.args[0]!r}") from None

    def to_hf(self) -> dict[str, Any]:
        """A ``config.json`` that ``transformers`` loads as the same model (LlamaForCausalLM or Qwen2)."""
        qwen2 = self.qkv_bias and not self.o_bias
        d: dict[str, Any] = {
            "architectures": ["Qwen2ForCausalLM" if qwen2 else "LlamaForCausalLM"],
            "model_type": "qwen2" if qwen2 else "llama",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "num_hidden_layers": self.num_hidden_layers,
            "vocab_size": self.vocab_size,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling.to_hf(),
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "torch_dtype": "float32",
            "mlp_bias": self.mlp_bias,
        }
        if not qwen2:
            d["attention_bias"] = self.qkv_bias
        if self.bos_token_id is not None:
            d["bos_token_id"] = self.bos_token_id
        if self.eos_token_id is not None:
            d["eos_token_id"] = self.eos_token_id
        return d

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ModelConfig:
        d = dict(d)
        d["rope_scaling"] = RopeScaling(**(d.get("rope_scaling") or {}))
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})
