"""Import a Hugging Face model directory (config.json + safetensors + tokenizer) into the store.

Tensors are read lazily with ``safe_open`` one block at a time, so a model larger than RAM
imports fine. Never unpickles: ``.bin``/``.pt`` checkpoints are refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from edgemesh.errors import ConfigError
from edgemesh.weights.config import ModelConfig
from edgemesh.weights.progress import Progress
from edgemesh.weights.quant import check_fits, check_scheme, quantize_block, quantized_name
from edgemesh.weights.store import ModelEntry, ModelStore

# store name -> HF name (relative to "model.layers.{i}." for decoder blocks)
_ATTN = {"norm": "input_layernorm.weight", "wq": "self_attn.q_proj.weight", "wk": "self_attn.k_proj.weight",
         "wv": "self_attn.v_proj.weight", "wo": "self_attn.o_proj.weight", "bq": "self_attn.q_proj.bias",
         "bk": "self_attn.k_proj.bias", "bv": "self_attn.v_proj.bias", "bo": "self_attn.o_proj.bias"}
_MLP = {"norm": "post_attention_layernorm.weight", "w_gate": "mlp.gate_proj.weight", "w_up": "mlp.up_proj.weight",
        "w_down": "mlp.down_proj.weight", "b_gate": "mlp.gate_proj.bias", "b_up": "mlp.up_proj.bias",
        "b_down": "mlp.down_proj.bias"}


def hf_tensor_names(config: ModelConfig, block: str) -> dict[str, str]:
    """Store tensor name -> HF state-dict name for ``block`` (also used to export to HF)."""
    if block == "input":
        return {"embed": "model.embed_tokens.weight"}
    if block == "output":
        names = {"norm": "model.norm.weight"}
        if not config.tie_word_embeddings:
            names["lm_head"] = "lm_head.weight"
        return names
    kind, i = block.split("_")
    table = _ATTN if kind == "attn" else _MLP
    optional = {"bq", "bk", "bv"} if not config.qkv_bias else set()
    optional |= {"bo"} if not config.o_bias else set()
    optional |= {"b_gate", "b_up", "b_down"} if not config.mlp_bias else set()
    return {k: f"model.layers.{i}.{v}" for k, v in table.items() if k not in optional}


def import_hf(
    store: ModelStore,
    src: Path,
    *,
    name: str | None = None,
    dtype: torch.dtype = torch.float32,
    progress: Progress | None = None,
    quantize: str | None = None,
) -> ModelEntry:
    """``quantize="int8"`` stores weight-only int8 (per-row scales) instead of ``dtype``."""
    quantize = check_scheme(quantize)
    src = Path(src)
    cfg_path = src / "config.json"
    if not cfg_path.is_file():
        raise ConfigError(f"{src}: not a Hugging Face model directory (no config.json)")
    raw = json.loads(cfg_path.read_text())
    config = ModelConfig.from_hf(raw)
    files = sorted(src.glob("*.safetensors"))
    if not files:
        if list(src.glob("*.bin")) or list(src.glob("*.pt")):
            raise ConfigError(f"{src}: only pickle checkpoints (.bin/.pt); edgemesh loads safetensors only")
        raise ConfigError(f"{src}: no .safetensors files")
    where: dict[str, Path] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            for key in sf.keys():
                where[key] = f
    check_fits(config, quantize)
    writer = store.writer(name or quantized_name(src.name, quantize), config, source=f"hf:{src}",
                          dtype=quantize or str(dtype).removeprefix("torch."))
    blocks = config.block_names()
    for n, block in enumerate(blocks):
        tensors: dict[str, torch.Tensor] = {}
        for short, long in hf_tensor_names(config, block).items():
            if long not in where:
                raise ConfigError(f"{src}: tensor {long!r} missing (needed for block {block})")
            with safe_open(str(where[long]), framework="pt") as sf:
                tensors[short] = sf.get_tensor(long).to(dtype)
        writer.write_block(block, quantize_block(tensors, quantize))
        if progress:
            progress(n + 1, len(blocks), block)
    for aux in ("tokenizer.json", "tokenizer_config.json"):
        if (src / aux).is_file():
            data = (src / aux).read_bytes()
            if aux == "tokenizer_config.json" and (src / "chat_template.jinja").is_file():
                tc = json.loads(data)
                tc["chat_template"] = (src / "chat_template.jinja").read_text()
                data = json.dumps(tc, indent=1).encode()
            writer.write_file(aux, data)
    return writer.finish()


def export_hf(entry: ModelEntry, dst: Path) -> None:
    """Write the store model as a HF directory (config.json + model.safetensors) for references."""
    from safetensors.torch import save_file

    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    from edgemesh.weights.quant import dequantize_block

    state: dict[str, torch.Tensor] = {}
    for block in entry.blocks:
        tensors = dequantize_block(entry.load_block(block))  # HF has no int8 layout of ours
        for short, long in hf_tensor_names(entry.config, block).items():
            state[long] = tensors[short]
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps(entry.config.to_hf(), indent=1))
    for aux in ("tokenizer.json", "tokenizer_config.json"):
        if entry.has(aux):
            (dst / aux).write_bytes(entry.path(aux).read_bytes())
