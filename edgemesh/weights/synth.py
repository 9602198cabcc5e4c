"""Random weights of any Llama shape, one block at a time (never the whole model in RAM)."""

from __future__ import annotations

import hashlib
import math

import torch

from edgemesh.weights.config import ModelConfig
from edgemesh.weights.progress import Progress
from edgemesh.weights.quant import check_fits, check_scheme, quantize_block, quantized_name
from edgemesh.weights.store import ModelEntry, ModelStore


def _block_seed(seed: int, block: str) -> int:
    # Each block gets its own stream, so any block can be regenerated alone and order does not matter.
    return int.from_bytes(hashlib.sha256(f"{seed}:{block}".encode()).digest()[:8], "little")


def random_block(config: ModelConfig, block: str, seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The full (unsliced) tensors of ``block``.

    Scales ~1/sqrt(fan_in) keep activations O(1) through the layers, so logits are peaked
    enough that greedy decoding is not decided by rounding noise.
    """
    g = torch.Generator().manual_seed(_block_seed(seed, block))
    h, f, v, d = config.hidden_size, config.intermediate_size, config.vocab_size, config.head_dim
    nq, nkv = config.num_attention_heads, config.num_key_value_heads

    def w(*shape: int, fan_in: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) / math.sqrt(fan_in)).to(dtype)

    def norm() -> torch.Tensor:
        return (1.0 + 0.1 * torch.randn(h, generator=g)).to(dtype)

    if block == "input":
        return {"embed": torch.randn(v, h, generator=g).to(dtype)}
    if block == "output":
        out = {"norm": norm()}
        if not config.tie_word_embeddings:
            out["lm_head"] = w(v, h, fan_in=h)
        return out
    if block.startswith("attn_"):
        t = {"norm": norm(), "wq": w(nq * d, h, fan_in=h), "wk": w(nkv * d, h, fan_in=h),
             "wv": w(nkv * d, h, fan_in=h), "wo": w(h, nq * d, fan_in=nq * d)}
        if config.qkv_bias:
            t.update(bq=w(nq * d, fan_in=4), bk=w(nkv * d, fan_in=4), bv=w(nkv * d, fan_in=4))
        if config.o_bias:
            t["bo"] = w(h, fan_in=4)
        return t
    if block.startswith("mlp_"):
        t = {"norm": norm(), "w_gate": w(f, h, fan_in=h), "w_up": w(f, h, fan_in=h), "w_down": w(h, f, fan_in=f)}
        if config.mlp_bias:
            t.update(b_gate=w(f, fan_in=4), b_up=w(f, fan_in=4), b_down=w(h, fan_in=4))
        return t
    raise ValueError(f"unknown block {block!r}")


def synth_model(
    store: ModelStore,
    config: ModelConfig,
    *,
    seed: int = 0,
    name: str | None = None,
    dtype: torch.dtype = torch.float32,
    progress: Progress | None = None,
    aux_files: dict[str, bytes] | None = None,
    quantize: str | None = None,
) -> ModelEntry:
    """Write a random-weight model block by block: peak RAM ≈ one block, any model size.

    ``aux_files`` (tokenizer.json, tokenizer_config.json) let the random model be served and
    chatted with like a real one, e.g. for load and failure tests. ``quantize="int8"`` stores the
    int8 version of exactly these random weights (same seed, same fp32 values before rounding).
    """
    quantize = check_scheme(quantize)
    name = name or quantized_name(default_synth_name(config, seed), quantize)
    check_fits(config, quantize)
    writer = store.writer(name, config, source=f"synth:seed={seed}",
                          dtype=quantize or str(dtype).removeprefix("torch."))
    for key, data in (aux_files or {}).items():
        writer.write_file(key, data)
    blocks = config.block_names()
    for i, block in enumerate(blocks):
        writer.write_block(block, quantize_block(random_block(config, block, seed, dtype), quantize))
        if progress:
            progress(i + 1, len(blocks), block)
    writer.entry.extra = {"seed": seed}
    return writer.finish()


def default_synth_name(config: ModelConfig, seed: int) -> str:
    c = config
    return (f"synth-l{c.num_hidden_layers}-h{c.hidden_size}-a{c.num_attention_heads}-kv{c.num_key_value_heads}"
            f"-f{c.intermediate_size}-v{c.vocab_size}-s{seed}")
