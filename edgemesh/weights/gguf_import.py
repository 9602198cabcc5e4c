"""Import a GGUF file (llama.cpp format) into the store: dequantize, un-permute, tokenizer.

Two things differ from HF checkpoints and are undone here:
- llama.cpp's converter permutes Llama Q/K rows from HF's half-split RoPE layout to the
  interleaved layout; we permute them back (not for Qwen2, whose converter does not permute).
- The tokenizer lives in metadata (``tokenizer.ggml.*``); we rebuild an equivalent HF
  ``tokenizers`` byte-level BPE and keep the chat template.
GGUF stores eps as float32 (9.9999997e-06 for 1e-5); we keep that exact value.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgemesh.errors import ConfigError
from edgemesh.weights.config import ModelConfig, RopeScaling
from edgemesh.weights.progress import Progress
from edgemesh.weights.quant import check_fits, check_scheme, quantize_block, quantized_name
from edgemesh.weights.store import ModelEntry, ModelStore

_ATTN = {"norm": "attn_norm", "wq": "attn_q", "wk": "attn_k", "wv": "attn_v", "wo": "attn_output"}
_MLP = {"norm": "ffn_norm", "w_gate": "ffn_gate", "w_up": "ffn_up", "w_down": "ffn_down"}
_SUPPORTED = ("llama", "qwen2")


def _fields(reader: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer.ggml.") and key.endswith(("tokens", "merges", "token_type", "scores")):
            continue  # large arrays: read on demand
        try:
            out[key] = field.contents()
        except Exception:  # noqa: BLE001 - an exotic field we do not need
            continue
    return out


def _array(reader: Any, key: str) -> list[Any]:
    field = reader.fields.get(key)
    return [] if field is None else list(field.contents())


def gguf_config(meta: dict[str, Any], n_vocab: int, tied: bool) -> ModelConfig:
    arch = meta.get("general.architecture")
    if arch not in _SUPPORTED:
        raise ConfigError(f"GGUF architecture {arch!r} is not supported (supported: {', '.join(_SUPPORTED)})")

    def get(key: str, default: Any = None) -> Any:
        v = meta.get(f"{arch}.{key}", default)
        if v is None:
            raise ConfigError(f"GGUF metadata lacks {arch}.{key}")
        return v

    n_heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    scaling = RopeScaling()
    kind = meta.get(f"{arch}.rope.scaling.type")
    if kind == "linear":
        scaling = RopeScaling("linear", float(get("rope.scaling.factor")))
    elif kind not in (None, "none"):
        raise ConfigError(f"GGUF rope scaling {kind!r} is not supported")
    return ModelConfig(
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length")),
        num_attention_heads=n_heads,
        num_key_value_heads=int(meta.get(f"{arch}.attention.head_count_kv", n_heads)),
        num_hidden_layers=int(get("block_count")),
        vocab_size=int(meta.get(f"{arch}.vocab_size", n_vocab)),
        # float32 → Python float keeps GGUF's exact value (e.g. 9.999999747378752e-06)
        rms_norm_eps=float(np.float32(get("attention.layer_norm_rms_epsilon"))),
        rope_theta=float(np.float32(get("rope.freq_base", 10000.0))),
        rope_scaling=scaling,
        tie_word_embeddings=tied,
        max_position_embeddings=int(get("context_length", 2048)),
        head_dim=int(meta.get(f"{arch}.attention.key_length", hidden // n_heads)),
        qkv_bias=arch == "qwen2",
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
    )


def unpermute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of llama.cpp's ``permute``: interleaved (x0,y0,x1,y1…) → half-split rows per head."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape).contiguous()


def _dequantize(t: Any) -> torch.Tensor:
    from gguf.quants import dequantize

    arr = dequantize(t.data, t.tensor_type)
    shape = tuple(int(s) for s in reversed(t.shape.tolist()))  # GGUF lists dims fastest-first
    # copy: F32 tensors come back as read-only views of the memory map
    return torch.from_numpy(np.array(arr, dtype=np.float32, copy=True).reshape(shape))


def gguf_tokenizer_files(reader: Any, meta: dict[str, Any]) -> dict[str, bytes]:
    """tokenizer.json + tokenizer_config.json rebuilt from GGUF metadata (byte-level BPE only)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ConfigError(f"GGUF tokenizer model {kind!r} is not supported yet (only byte-level BPE 'gpt2')")
    tokens = [str(t) for t in _array(reader, "tokenizer.ggml.tokens")]
    types = [int(t) for t in _array(reader, "tokenizer.ggml.token_type")]
    merges = [tuple(str(m).split(" ", 1)) for m in _array(reader, "tokenizer.ggml.merges")]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre in ("smollm", "starcoder", "refact", "deepseek-coder"):
        # llama.cpp splits every digit on its own before the GPT-2 regex for these vocabularies
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in ("qwen2", "llama-bpe", "llama3"):
        pattern = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                   r"|\s*[\r\n]+|\s+(?!\S)|\s+") if pre != "qwen2" else (
                   r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                   r"|\s*[\r\n]+|\s+(?!\S)|\s+")
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    # token_type 3 = control (special, never produced by plain text), 4 = user-defined
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == 3])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == 4])

    def token(key: str) -> str | None:
        i = meta.get(key)
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    tc = {
        "chat_template": meta.get("tokenizer.chat_template"),
        "bos_token": token("tokenizer.ggml.bos_token_id"),
        "eos_token": token("tokenizer.ggml.eos_token_id"),
        "pad_token": token("tokenizer.ggml.padding_token_id"),
        "unk_token": token("tokenizer.ggml.unknown_token_id"),
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
    }
    return {"tokenizer.json": tok.to_str().encode(), "tokenizer_config.json": json.dumps(tc, indent=1).encode()}


def import_gguf(
    store: ModelStore,
    path: Path,
    *,
    name: str | None = None,
    dtype: torch.dtype = torch.float32,
    progress: Progress | None = None,
    quantize: str | None = None,
) -> ModelEntry:
    """``quantize="int8"`` requantizes the dequantized GGUF weights to weight-only int8."""
    from gguf import GGUFReader

    quantize = check_scheme(quantize)
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such file")
    try:
        reader = GGUFReader(str(path))  # memory-maps the file; tensors are dequantized one at a time
    except Exception as exc:  # noqa: BLE001 - the gguf package raises assorted errors
        raise ConfigError(f"{path}: not a readable GGUF file ({exc})") from None
    meta = _fields(reader)
    tensors = {t.name: t for t in reader.tensors}
    n_vocab = len(_array(reader, "tokenizer.ggml.tokens")) or int(tensors["token_embd.weight"].shape[-1])
    config = gguf_config(meta, n_vocab, tied="output.weight" not in tensors)
    llama = meta["general.architecture"] == "llama"

    def get(gname: str) -> torch.Tensor:
        if gname not in tensors:
            raise ConfigError(f"{path}: tensor {gname!r} missing")
        return _dequantize(tensors[gname]).to(dtype)

    check_fits(config, quantize)
    writer = store.writer(name or quantized_name(path.stem, quantize), config, source=f"gguf:{path.name}",
                          dtype=quantize or str(dtype).removeprefix("torch."))
    blocks = config.block_names()
    for n, block in enumerate(blocks):
        if block == "input":
            out = {"embed": get("token_embd.weight")}
        elif block == "output":
            out = {"norm": get("output_norm.weight")}
            if not config.tie_word_embeddings:
                out["lm_head"] = get("output.weight")
        else:
            kind, i = block.split("_")
            table = dict(_ATTN if kind == "attn" else _MLP)
            out = {k: get(f"blk.{i}.{v}.weight") for k, v in table.items()}
            if kind == "attn":
                if llama:
                    out["wq"] = unpermute_rope_rows(out["wq"], config.num_attention_heads)
                    out["wk"] = unpermute_rope_rows(out["wk"], config.num_key_value_heads)
                if config.qkv_bias:
                    out.update(bq=get(f"blk.{i}.attn_q.bias"), bk=get(f"blk.{i}.attn_k.bias"),
                               bv=get(f"blk.{i}.attn_v.bias"))
        writer.write_block(block, quantize_block(out, quantize))
        if progress:
            progress(n + 1, len(blocks), block)
    for key, data in gguf_tokenizer_files(reader, meta).items():
        writer.write_file(key, data)
    writer.entry.extra = {"gguf_file_type": meta.get("general.file_type"), "gguf_name": meta.get("general.name")}
    return writer.finish()
