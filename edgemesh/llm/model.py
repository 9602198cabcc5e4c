"""Llama-family decoder as plain torch functions, run by one tensor-parallel participant.

The math (``rms_norm``, ``attention_block``, ``mlp_block``) knows nothing about distribution:
it computes whatever heads / intermediate rows its weight slice holds and returns a *partial*
output. ``Participant`` adds the distribution: it sums the partials with the injected
``Collective``, keeps the KV cache of its own heads, and on the master (rank 0) embeds the
tokens, broadcasts the hidden state and applies final norm + lm_head. With a
``LocalCollective`` and full slices it is the ordinary single-device model. Weight matrices
may be fp32 or int8 with per-row scales; ``qlinear`` picks the kernel.

Per forward the master sends ``broadcast_meta({"op": "forward", "start_pos": p})`` followed by
``broadcast(hidden)``; workers loop in ``serve()`` until ``{"op": "stop"}``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from edgemesh.collective.base import Collective
from edgemesh.errors import ConfigError
from edgemesh.llm import qlinear
from edgemesh.llm.rope import apply_rope, rope_table
from edgemesh.weights.config import ModelConfig
from edgemesh.weights.provider import WeightProvider
from edgemesh.weights.shard import ShardSpec


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Same op order as HF (normalize in fp32, scale in the input dtype) for bitwise-close logits.
    dtype = x.dtype
    xf = x.to(torch.float32)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


@dataclass
class KVCache:
    """Keys/values of this participant's KV heads only: [B, local_kv_heads, max_seq, head_dim]."""

    k: torch.Tensor
    v: torch.Tensor


def attention_block(
    x: torch.Tensor,
    w: dict[str, torch.Tensor],
    cache: KVCache,
    start_pos: int,
    cos: torch.Tensor,
    sin: torch.Tensor,
    config: ModelConfig,
) -> torch.Tensor:
    """Partial attention output [B, T, H] of the heads present in ``w`` (zeros if none)."""
    b, t, _ = x.shape
    d = config.head_dim
    n_kv = w["wk"].shape[0] // d
    if n_kv == 0:
        out = torch.zeros_like(x)
        return out + w["bo"] if "bo" in w else out
    n_q = w["wq"].shape[0] // d
    xn = rms_norm(x, w["norm"], config.rms_norm_eps)
    q = qlinear.linear(xn, w, "wq", w.get("bq")).view(b, t, n_q, d).transpose(1, 2)
    k = qlinear.linear(xn, w, "wk", w.get("bk")).view(b, t, n_kv, d).transpose(1, 2)
    v = qlinear.linear(xn, w, "wv", w.get("bv")).view(b, t, n_kv, d).transpose(1, 2)
    q = apply_rope(q, cos, sin)
    k = apply_rope(k, cos, sin)
    end = start_pos + t
    cache.k[:, :, start_pos:end] = k
    cache.v[:, :, start_pos:end] = v
    keys = cache.k[:, :, :end]
    vals = cache.v[:, :, :end]
    if n_q != n_kv:
        keys = keys.repeat_interleave(n_q // n_kv, dim=1)
        vals = vals.repeat_interleave(n_q // n_kv, dim=1)
    if t == 1:
        y = F.scaled_dot_product_attention(q, keys, vals)
    elif start_pos == 0:
        y = F.scaled_dot_product_attention(q, keys, vals, is_causal=True)
    else:  # chunked prefill after earlier tokens: query i sees keys 0..start_pos+i
        mask = torch.arange(end)[None, :] <= (start_pos + torch.arange(t))[:, None]
        y = F.scaled_dot_product_attention(q, keys, vals, attn_mask=mask)
    y = y.transpose(1, 2).reshape(b, t, n_q * d)
    return qlinear.linear(y, w, "wo", w.get("bo"))


def mlp_block(x: torch.Tensor, w: dict[str, torch.Tensor], config: ModelConfig) -> torch.Tensor:
    """Partial SwiGLU output [B, T, H] of the intermediate rows present in ``w``."""
    if w["w_gate"].shape[0] == 0:
        out = torch.zeros_like(x)
        return out + w["b_down"] if "b_down" in w else out
    xn = rms_norm(x, w["norm"], config.rms_norm_eps)
    gate = qlinear.linear(xn, w, "w_gate", w.get("b_gate"))
    up = qlinear.linear(xn, w, "w_up", w.get("b_up"))
    return qlinear.linear(F.silu(gate) * up, w, "w_down", w.get("b_down"))


class Participant:
    """One rank of a tensor-parallel group running the decoder layers of ``specs``.

    ``provider`` serves this rank's slices of ``attn_i``/``mlp_i`` (and, on rank 0,
    ``input`` and ``output``). ``specs[i]`` says which slice of layer i this rank holds; it is
    used to size the KV cache, the tensors themselves come from the provider.
    """

    def __init__(
        self,
        config: ModelConfig,
        specs: list[ShardSpec],
        provider: WeightProvider,
        collective: Collective,
        *,
        max_seq_len: int | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if len(specs) != config.num_hidden_layers:
            raise ConfigError(f"need one shard spec per layer ({config.num_hidden_layers}), got {len(specs)}")
        for s in specs:
            s.validate(config)
        self.config = config
        self.specs = specs
        self.provider = provider
        self.collective = collective
        self.dtype = dtype
        self.max_seq_len = min(max_seq_len or 2048, config.max_position_embeddings)
        self._cos, self._sin = rope_table(config, self.max_seq_len)
        self._caches: list[KVCache] = []
        self._batch = 0

    @property
    def rank(self) -> int:
        return self.collective.rank

    # ---- KV cache -------------------------------------------------------------------------

    def _ensure_cache(self, batch: int) -> None:
        if self._batch == batch and self._caches:
            return
        d = self.config.head_dim
        self._caches = []
        for s in self.specs:
            shape = (batch, len(s.kv_groups), self.max_seq_len, d)
            self._caches.append(KVCache(torch.zeros(shape, dtype=self.dtype), torch.zeros(shape, dtype=self.dtype)))
        self._batch = batch

    # ---- decoder layers (every rank) ------------------------------------------------------

    def run_layers(self, h: torch.Tensor, start_pos: int) -> torch.Tensor:
        t = h.shape[1]
        if start_pos + t > self.max_seq_len:
            raise ConfigError(
                f"sequence of {start_pos + t} tokens exceeds the context of {self.max_seq_len} tokens"
            )
        if start_pos == 0:
            self._ensure_cache(h.shape[0])
        elif self._batch != h.shape[0]:
            raise ConfigError("a decode step must use the batch size of its prefill")
        cos = self._cos[start_pos:start_pos + t]
        sin = self._sin[start_pos:start_pos + t]
        for i in range(self.config.num_hidden_layers):
            name = f"attn_{i}"
            w = self.provider.get(name)
            part = attention_block(h, w, self._caches[i], start_pos, cos, sin, self.config)
            del w
            self.provider.release(name)
            h = h + self.collective.allreduce_sum(part)
            name = f"mlp_{i}"
            w = self.provider.get(name)
            part = mlp_block(h, w, self.config)
            del w
            self.provider.release(name)
            h = h + self.collective.allreduce_sum(part)
        return h

    # ---- master (rank 0) ------------------------------------------------------------------

    def forward(self, tokens: torch.Tensor, start_pos: int = 0, *, last_only: bool = False) -> torch.Tensor:
        """Master only: logits [B, T, V] (or [B, 1, V] with ``last_only``) for ``tokens`` [B, T]
        placed at positions ``start_pos..start_pos+T-1``. ``start_pos == 0`` starts a new sequence."""
        if self.rank != 0:
            raise RuntimeError("forward() runs on the master (rank 0); workers run llm.follow.follow_master")
        if tokens.dim() == 1:
            tokens = tokens[None, :]
        w_in = self.provider.get("input")
        h = qlinear.embedding(tokens, w_in, "embed", self.dtype)
        del w_in
        self.provider.release("input")
        self.collective.broadcast_meta({"op": "forward", "start_pos": int(start_pos)})
        h = self.collective.broadcast(h.contiguous())
        h = self.run_layers(h, start_pos)
        if last_only:
            h = h[:, -1:]
        w_out = self.provider.get("output")
        h = rms_norm(h, w_out["norm"], self.config.rms_norm_eps)
        if "lm_head" in w_out:
            logits = qlinear.lm_head(h, w_out, "lm_head")
        else:  # tied: the head is the embedding matrix
            logits = qlinear.lm_head(h, self.provider.get("input"), "embed")
            self.provider.release("input")
        del w_out
        self.provider.release("output")
        return logits

    def stop_workers(self) -> None:
        """Master only: tell every worker's loop (``llm.follow.follow_master``) to return."""
        self.collective.broadcast_meta({"op": "stop"})
