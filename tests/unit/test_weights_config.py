"""HF config parsing and GGUF Q/K layout."""

from __future__ import annotations

import pytest
import torch

from edgemesh.errors import ConfigError
from edgemesh.weights.config import ModelConfig
from edgemesh.weights.gguf_import import unpermute_rope_rows

pytestmark = pytest.mark.unit


def test_from_hf_llama3_and_qwen2() -> None:
    llama = ModelConfig.from_hf({
        "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
        "num_key_value_heads": 8, "num_hidden_layers": 32, "vocab_size": 128256, "rope_theta": 500000.0,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192},
    })
    assert llama.head_dim == 128 and llama.group_size == 4 and llama.rope_scaling.factor == 8.0
    assert llama.num_parameters() == 8_030_261_248  # Llama-3-8B as published
    qwen = ModelConfig.from_hf({"model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864,
                                "num_attention_heads": 14, "num_key_value_heads": 2, "num_hidden_layers": 24,
                                "vocab_size": 151936, "tie_word_embeddings": True})
    assert qwen.qkv_bias and not qwen.o_bias and qwen.tie_word_embeddings
    assert ModelConfig.from_hf(qwen.to_hf()) == qwen
    assert ModelConfig.from_json(llama.to_json()) == llama


def test_bad_configs_are_refused() -> None:
    with pytest.raises(ConfigError, match="multiple of"):
        ModelConfig(64, 128, 6, 4, 1, 10)
    with pytest.raises(ConfigError, match="missing key 'hidden_size'"):
        ModelConfig.from_hf({"num_attention_heads": 4})
    with pytest.raises(ConfigError, match="rope_scaling"):
        ModelConfig.from_hf({"hidden_size": 8, "intermediate_size": 8, "num_attention_heads": 2,
                             "num_hidden_layers": 1, "vocab_size": 4, "rope_scaling": {"type": "yarn"}})


def test_gguf_unpermute_inverts_llama_cpp_permute() -> None:
    n_heads, d, h = 3, 8, 5
    w = torch.randn(n_heads * d, h)
    # llama.cpp convert_hf_to_gguf.py: reshape(n_head, 2, d/2, …).swapaxes(1, 2)
    permuted = w.reshape(n_heads, 2, d // 2, h).transpose(1, 2).reshape(w.shape)
    assert torch.equal(unpermute_rope_rows(permuted, n_heads), w)
