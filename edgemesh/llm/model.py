"""Llama-family decoder as plain torch functions, run by one tensor-parallel participant.

The math (``rms_norm``, ``attention_block``, ``mlp_block``) knows nothing about distribution:
it computes whatever heads / intermediate rows its weight slice holds and returns a *partial*
output. ``Participant`` adds the distribution: it sums the partials with the injected
``Collective``, keeps the KV cache of its own heads, and applies the final norm and *its
vocabulary rows* of the LM head (``weights.shard.vocab_range``: every rank holds a share of
the head, sized like its MLP share). The master (rank 0) also keeps the whole embedding and
does the token lookup for the group. The other choice, a split lookup, would cost one more
allreduce of [B, T, H] per step to save the master the embedding rows it does not head (SmolLM2
at 3 even ranks: 75 MB of 113 MB fp32, 19 MB int8). Measured (README, "The LM head split by
vocabulary"): a star allreduce of 576 floats took 0.35–0.85 ms on this busy 2-core host and
3.4 ms on lan-4, while the head split already brought the master's compute per token down to
the workers' (fp32: 90–93 → 62 ms against 56–67) and the lookup of one token takes ~10 µs
(measured): splitting it would only add latency. A memory-short master streams ``input``
through the weight window instead.
With a ``LocalCollective`` and full slices it is the ordinary single-device model. Weight
matrices may be fp32 or int8 with per-row scales; ``qlinear`` picks the kernel.

Per step the master sends ``broadcast_meta({"op": "forward", "start_pos": p, "head": …})``
followed by ``broadcast(hidden)``; after the layers every rank runs its head rows and the
step ends with one ``gather`` to the master: of the whole logits (``"head": "logits"``,
``forward``) or of a few numbers per rank from which the master chooses the next token
(``"head": "choose"``, ``forward_choose``, see ``llm.choice``). Workers loop in
``llm.follow.follow_master`` until ``{"op": "stop"}``.
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from edgemesh import kernels
from edgemesh.collective.base import Collective, LocalCollective
from edgemesh.errors import ConfigError, EdgemeshError
from edgemesh.llm import qlinear
from edgemesh.llm.choice import Choice, decide, summarize
from edgemesh.llm.rope import apply_rope, rope_table
from edgemesh.llm.sampling import Sampler
from edgemesh.weights.config import ModelConfig
from edgemesh.weights.provider import InMemoryProvider, WeightProvider
from edgemesh.weights.quant import SCALE
from edgemesh.weights.shard import ShardSpec

# Prefills of at least this many positions overlap their allreduces with compute
# (``Participant._overlapped_layers``): two chunks of 16+ rows, well above the decode kernels' 4.
OVERLAP_MIN_TOKENS = 32
# A quantized block converted once for both chunks may take this much memory; a larger one
# is converted product by product (one matrix at a time, as without chunks).
WIDEN_MAX_BYTES = 64 << 20
LOGIT_ROWS = 16  # positions of whole logits per gather message (bounds the message: 16·V·4 bytes)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        # one op instead of six (16 vs 24 us at decode); the same values in fp32
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    # Same op order as HF (normalize in fp32, scale in the input dtype) for bitwise-close logits.
    dtype = x.dtype
    xf = x.to(torch.float32)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


class _NoAllreduce:
    """The native decode loop's allreduce for a world of one: none (a null callback)."""

    fn = ctx = 0

    def begin(self) -> bool:
        return True

    def end(self) -> None:
        pass

    def finish(self, part: torch.Tensor) -> torch.Tensor:  # never called: nothing can stop
        return part


_NO_ALLREDUCE = _NoAllreduce()


def _overlap_enabled() -> bool:
    return os.environ.get("EDGEMESH_PREFILL_OVERLAP", "1").strip().lower() not in ("0", "false", "no", "off")


def decode_allreduce(collective: Collective, numel: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """The allreduce a decode step runs for ``numel`` values: the group's native one when the
    native decode loop would use it (``Participant._native_layers``), else ``allreduce_sum``.
    For measurements of that op (``bench generate``'s in-band probe)."""
    get = getattr(collective, "native_allreduce", None)
    native = get(numel) if get is not None else None
    return native.allreduce_sum if native is not None else collective.allreduce_sum


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
    if t == 1 and b == 1:  # one decode token, int8 weights: the whole block in one native call
        out = kernels.attention_decode(x, w, cache.k, cache.v, start_pos, cos, sin, config.rms_norm_eps, d)
        if out is not None:
            return out
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
    # Grouped-query heads read their KV head in place (no repeated copy of the cache; the same
    # values bit for bit, measured).
    gqa = n_q != n_kv
    if t == 1:
        y = F.scaled_dot_product_attention(q, keys, vals, enable_gqa=gqa)
    elif start_pos == 0:
        y = F.scaled_dot_product_attention(q, keys, vals, is_causal=True, enable_gqa=gqa)
    else:  # chunked prefill after earlier tokens: query i sees keys 0..start_pos+i
        mask = torch.arange(end)[None, :] <= (start_pos + torch.arange(t))[:, None]
        y = F.scaled_dot_product_attention(q, keys, vals, attn_mask=mask, enable_gqa=gqa)
    y = y.transpose(1, 2).reshape(b, t, n_q * d)
    return qlinear.linear(y, w, "wo", w.get("bo"))


def mlp_block(x: torch.Tensor, w: dict[str, torch.Tensor], config: ModelConfig) -> torch.Tensor:
    """Partial SwiGLU output [B, T, H] of the intermediate rows present in ``w``."""
    if w["w_gate"].shape[0] == 0:
        out = torch.zeros_like(x)
        return out + w["b_down"] if "b_down" in w else out
    if x.numel() == x.shape[-1]:  # one decode token, int8 weights: one native call
        out = kernels.mlp_decode(x, w, config.rms_norm_eps)
        if out is not None:
            return out
    xn = rms_norm(x, w["norm"], config.rms_norm_eps)
    gate = qlinear.linear(xn, w, "w_gate", w.get("b_gate"))
    up = qlinear.linear(xn, w, "w_up", w.get("b_up"))
    return qlinear.linear(F.silu(gate) * up, w, "w_down", w.get("b_down"))


class Participant:
    """One rank of a tensor-parallel group running the decoder layers of ``specs``.

    ``provider`` serves this rank's slices of ``attn_i``/``mlp_i``, ``output`` (the final norm
    and rows ``vocab`` of the head) and, on rank 0, ``input``. ``specs[i]`` says which slice of
    layer i this rank holds; it is used to size the KV cache, the tensors themselves come from
    the provider. ``vocab`` is this rank's ``weights.shard.vocab_range`` in a planned group;
    without it rank 0 holds the whole head and the others none (the layout before the head was
    split, which hand-built groups in tests use).
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
        vocab: tuple[int, int] | None = None,
    ) -> None:
        if len(specs) != config.num_hidden_layers:
            raise ConfigError(f"need one shard spec per layer ({config.num_hidden_layers}), got {len(specs)}")
        for s in specs:
            s.validate(config)
        self.config = config
        self.specs = specs
        self.provider = provider
        self.collective = collective
        # The master's choice for its group's prefills (``overlap_applies``); a deployment sets
        # it from where its ranks run: the overlap paid where they share one machine, and cost
        # time between devices on emulated 300 Mbit/s links (README, Benchmarks).
        self.overlap_prefill = True
        self.dtype = dtype
        self.max_seq_len = min(max_seq_len or 2048, config.max_position_embeddings)
        self._cos, self._sin = rope_table(config, self.max_seq_len)
        self._caches: list[KVCache] = []
        self._batch = 0
        # This rank's rows of the head: ``vocab_range`` for a planned group (``rank_files`` cut
        # the files so); None = the whole head on the master (a group built by hand, as tests do).
        v = config.vocab_size
        self.vocab = vocab if vocab is not None else ((0, v) if collective.rank == 0 else (v, v))
        if not 0 <= self.vocab[0] <= self.vocab[1] <= v:
            raise ConfigError(f"vocabulary range {self.vocab} outside 0:{v}")
        self._last_logits: torch.Tensor | None = None
        self._table: kernels.LayerTable | None = None  # the native decode loop's, for _table_key
        self._table_key: tuple[Any, ...] | None = None
        self.full_logit_choices = 0  # sampled steps the candidates did not decide (whole logits gathered)

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

    def run_layers(self, h: torch.Tensor, start_pos: int, *, overlap: bool | None = None) -> torch.Tensor:
        """This rank's part of every layer for hidden states ``h`` at ``start_pos``. ``overlap``:
        run a prefill as two chunks with the allreduces on a second thread
        (``_overlapped_layers``); every rank of the group must pass the same value (the master
        sends its ``overlap_applies`` with the step); None = decide here, for callers that
        run every rank themselves."""
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
        if t == 1 and h.shape[0] == 1:
            out = self._native_layers(h, start_pos, cos, sin)
            if out is not None:
                return out
        if (self.overlap_applies(t) if overlap is None else overlap and t >= OVERLAP_MIN_TOKENS):
            return self._overlapped_layers(h, start_pos, cos, sin)
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

    def overlap_applies(self, positions: int) -> bool:
        """Whether a step of ``positions`` positions runs overlapped: a prefill in a group, in
        chunks large enough for the prefill kernels (``qlinear``: more than ``kernels.MAX_M``
        rows), if ``overlap_prefill`` is set and not ``EDGEMESH_PREFILL_OVERLAP=0`` (read where
        the decision is made: on the master, for the whole group)."""
        return (self.overlap_prefill and self.collective.world_size > 1 and positions >= OVERLAP_MIN_TOKENS
                and _overlap_enabled())

    def _overlapped_layers(self, h: torch.Tensor, start_pos: int, cos: torch.Tensor,
                           sin: torch.Tensor) -> torch.Tensor:
        """The prefill's layers as two chunks of positions, each block's allreduce of one chunk
        running on a second thread while this one computes the block of the other: the wire
        time (and the other ranks' lag) hides behind compute instead of adding to it.

        The same ops in the same order on every rank (chunk 0, then 1, for every block), so
        the group stays in step; every op is waited for before this returns, also on an
        error. Chunk 1's attention sees chunk 0's keys of the same layer (already cached),
        as a chunked prefill does. With weights in memory each quantized block is converted
        once for both chunks (``qlinear.widened``: each chunk's product is the one the per-call
        conversion gives for its rows), up to ``WIDEN_MAX_BYTES`` a block; a weight window, or
        a larger block, keeps the per-product conversion and so its memory bound."""
        widen = isinstance(self.provider, InMemoryProvider)
        t = h.shape[1]
        cut = t // 2
        spans = [(0, cut), (cut, t)]
        hs = [h[:, a:b] for a, b in spans]
        pending: list[Future[torch.Tensor] | None] = [None, None]
        allreduce = self.collective.allreduce_sum
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgemesh-prefill-allreduce") as pool:
            try:
                for i in range(self.config.num_hidden_layers):
                    for kind in ("attn", "mlp"):
                        name = f"{kind}_{i}"
                        w = self.provider.get(name)
                        if widen:
                            w = qlinear.widened(w, h.dtype, WIDEN_MAX_BYTES)
                        for c, (a, b) in enumerate(spans):
                            job = pending[c]
                            if job is not None:
                                hs[c] = hs[c] + job.result()
                            if kind == "attn":
                                part = attention_block(hs[c], w, self._caches[i], start_pos + a, cos[a:b], sin[a:b],
                                                       self.config)
                            else:
                                part = mlp_block(hs[c], w, self.config)
                            pending[c] = pool.submit(allreduce, part)
                        del w
                        self.provider.release(name)
                for c, job in enumerate(pending):
                    assert job is not None
                    hs[c] = hs[c] + job.result()
            finally:
                for job in pending:  # an op still queued has no one to run it for: drop it
                    if job is not None:
                        job.cancel()
        return torch.cat(hs, dim=1)

    def _native_layers(self, h: torch.Tensor, pos: int, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor | None:
        """The decode step's layers in one native loop, allreduces included (``kernels.
        decode_layers``): the same blocks, sums and residuals as the loop above, without
        Python between them. None where it does not apply (weights outside memory, formats or
        shapes the C code does not take, a collective without a native allreduce)."""
        if h.dtype != torch.float32 or not isinstance(self.provider, InMemoryProvider) or kernels.native() is None:
            return None  # (native() also covers kernels.torch_only(): a table built before it stays unused)
        hdim = h.shape[-1]
        if isinstance(self.collective, LocalCollective):  # one device: no allreduce at all
            allreduce: Any = _NO_ALLREDUCE
        else:
            native_allreduce = getattr(self.collective, "native_allreduce", None)
            allreduce = native_allreduce(hdim) if native_allreduce is not None else None
            if allreduce is None:
                return None
        key = self._table_key  # provider and cache list by identity: a new cache, a new table
        if key is None or key[0] is not self.provider or key[1] is not self._caches or key[2] != hdim:
            blocks = [(self.provider.get(f"attn_{i}"), self.provider.get(f"mlp_{i}"), c.k, c.v)
                      for i, c in enumerate(self._caches)]
            self._table = kernels.layer_table(blocks, hdim, self.config.head_dim)
            self._table_key = (self.provider, self._caches, hdim)
        table = self._table
        if table is None or not allreduce.begin():
            return None
        x = h.reshape(-1).clone()  # the residual stream, updated in place
        block = 0
        try:
            while True:
                block = kernels.decode_layers(table, x, block, self.config.rms_norm_eps, cos, sin, pos,
                                              allreduce.fn, allreduce.ctx)
                if block >= table.blocks:
                    break
                x += allreduce.finish(table.part)  # the op the C loop could not finish, then on
                block += 1
        finally:
            allreduce.end()
        return x.view(h.shape)

    # ---- the head: every rank holds its vocabulary rows ------------------------------------

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm + this rank's vocabulary rows of the head: logits [B, T, stop − start]."""
        start, stop = self.vocab
        if start == stop:  # no head rows here
            return h.new_zeros(*h.shape[:-1], 0)
        w_out = self.provider.get("output")
        h = rms_norm(h, w_out["norm"], self.config.rms_norm_eps)
        if "lm_head" in w_out:
            w, name = w_out, "lm_head"
        else:  # tied, on the master: its rows are the first ones of the embedding it keeps for the lookup
            w_in = self.provider.get("input")
            w, name = {k: v[start:stop] for k, v in w_in.items() if k in ("embed", "embed" + SCALE)}, "embed"
            del w_in
            self.provider.release("input")
        if w[name].shape[0] != stop - start:
            raise ConfigError(f"rank {self.rank} holds {w[name].shape[0]} head rows, its vocabulary range "
                              f"{start}:{stop} needs {stop - start}: the slice files do not fit the plan")
        logits = qlinear.lm_head(h, w, name)
        del w, w_out
        self.provider.release("output")
        return logits

    def head_logits(self, h: torch.Tensor, last_only: bool) -> torch.Tensor | None:
        """Every rank: the head on ``h``; the master gets the whole logits [B, T, V] (the slices
        gathered, ``LOGIT_ROWS`` positions per message), the others None."""
        if last_only:
            h = h[:, -1:]
        local = self.head(h)
        if self.collective.world_size == 1:
            return local
        rows = []
        for lo in range(0, local.shape[1], LOGIT_ROWS):
            parts = self.collective.gather(local[:, lo:lo + LOGIT_ROWS].contiguous())
            if parts is not None:
                rows.append(torch.cat(parts, dim=-1))
        return torch.cat(rows, dim=1) if rows else None

    def choose_step(self, h: torch.Tensor, choice: Choice, sampler: Sampler | None = None) -> int | None:
        """Every rank: the next token after the last position of ``h`` [1, T, H], chosen from
        the ranks' summaries (``llm.choice``); the master returns it, the others None."""
        local = self.head(h[:, -1:])[0, -1]
        self._last_logits = local
        parts = self.collective.gather(summarize(local, self.vocab[0], choice))
        if parts is None:
            return None
        if sampler is None:
            raise RuntimeError("the master's choose_step needs the request's sampler")
        token = decide(parts, choice, sampler, self.config.vocab_size)
        if token is None:  # the candidates do not decide it: sample from the whole logits
            self.full_logit_choices += 1
            self.collective.broadcast_meta({"op": "logits"})
            gathered = self.collective.gather(local)
            assert gathered is not None
            token = sampler(torch.cat(gathered))
        return token

    def send_last_logits(self) -> None:
        """Worker: this rank's slice of the last chosen step's logits, to the master."""
        if self._last_logits is None:
            raise EdgemeshError("the master asked for logits before any step chose a token")
        self.collective.gather(self._last_logits)

    # ---- master (rank 0) ------------------------------------------------------------------

    def _begin_step(self, tokens: torch.Tensor, start_pos: int, head: dict[str, Any]) -> torch.Tensor:
        """Master: embed, send the step to the workers, run the layers; the last hidden state."""
        if self.rank != 0:
            raise RuntimeError("forward() runs on the master (rank 0); workers run llm.follow.follow_master")
        h = self._embed(tokens)
        overlap = self.overlap_applies(tokens.shape[1])  # the master decides for the group
        flag = {"overlap": True} if overlap else {}  # (absent = false: no bytes on a decode step)
        self.collective.broadcast_meta({"op": "forward", "start_pos": int(start_pos), **flag, **head})
        h = self.collective.broadcast(h.contiguous())
        return self.run_layers(h, start_pos, overlap=overlap)

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """The embedding rows of ``tokens``: only those rows when the provider can read rows
        (a streamed, untied embedding), else from the whole table."""
        rows = getattr(self.provider, "rows", None)
        if rows is not None:
            ids, where = torch.unique(tokens, return_inverse=True)
            picked = rows("input", ("embed", "embed" + SCALE), ids.tolist())
            if picked is not None:
                return qlinear.embedding(where, picked, "embed", self.dtype)
        w_in = self.provider.get("input")
        h = qlinear.embedding(tokens, w_in, "embed", self.dtype)
        del w_in
        self.provider.release("input")
        return h

    def forward(self, tokens: torch.Tensor, start_pos: int = 0, *, last_only: bool = False) -> torch.Tensor:
        """Master only: logits [B, T, V] (or [B, 1, V] with ``last_only``) for ``tokens`` [B, T]
        placed at positions ``start_pos..start_pos+T-1``. ``start_pos == 0`` starts a new sequence.
        The whole logits travel from every rank: for callers that need them (tests, speculative
        verification); the decode loop uses ``forward_choose``."""
        if tokens.dim() == 1:
            tokens = tokens[None, :]
        h = self._begin_step(tokens, start_pos, {"head": "logits", "last_only": bool(last_only)})
        logits = self.head_logits(h, last_only)
        assert logits is not None
        return logits

    def forward_choose(self, tokens: torch.Tensor, start_pos: int, sampler: Sampler) -> int:
        """Master only: like ``forward`` for one sequence, but returns the next token chosen by
        ``sampler``'s rule over the split vocabulary (a few numbers per rank on the wire, not
        the logits). Same distribution as ``sampler`` on the whole logits; greedy: the same token."""
        if tokens.dim() == 1:
            tokens = tokens[None, :]
        if tokens.shape[0] != 1:
            raise ConfigError("forward_choose decodes one sequence (batch 1)")
        choice = Choice.for_step(sampler)
        h = self._begin_step(tokens, start_pos, {"head": "choose", "choice": choice.to_meta()})
        token = self.choose_step(h, choice, sampler)
        assert token is not None
        return token

    def stop_workers(self) -> None:
        """Master only: tell every worker's loop (``llm.follow.follow_master``) to return."""
        self.collective.broadcast_meta({"op": "stop"})
