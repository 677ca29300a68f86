"""Grouped-query attention for the whole family: optional q/k/v bias (Qwen2), q/k RMSNorm
(Qwen3 and later) and the sigmoid output gate of Qwen3.5's full-attention layers.
K/V are cached once per KV head; scaled_dot_product_attention broadcasts them over
the query groups, so nothing is repeated in memory. In a batch (`KVBatch`) each sequence
attends over its own K/V, at its own position."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..cache import KVBatch
from ..config import ModelConfig
from .fused import fuse, project
from .rope import RoPE

_PROJECTIONS = ("q_proj", "k_proj", "v_proj")


def positions(cache) -> int | mx.array:
    """Where the next tokens go: the offset of a sequence's cache, or each row's in a batch."""
    if isinstance(cache, KVBatch):
        return cache.offsets
    return cache.offset if cache is not None else 0


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.gated = cfg.family == "qwen3_5"
        self.qk_norm = cfg.family != "qwen2"
        self.scale = self.head_dim**-0.5
        q_out = self.n_heads * self.head_dim * (2 if self.gated else 1)
        self.q_proj = nn.Linear(cfg.hidden_size, q_out, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=cfg.attention_bias)
        o_bias = cfg.attention_bias and cfg.family != "qwen2"
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=o_bias)
        if self.qk_norm:
            self.q_norm = nn.RMSNorm(self.head_dim, eps=cfg.rms_norm_eps)
            self.k_norm = nn.RMSNorm(self.head_dim, eps=cfg.rms_norm_eps)
        self.rope = RoPE(self.head_dim, cfg.rope, cfg.max_position_embeddings)
        self._sizes = (q_out, *2 * [self.n_kv_heads * self.head_dim])

    def fuse(self) -> None:
        fuse(self, _PROJECTIONS)

    def inputs(self, x: mx.array, offset: int | mx.array) -> tuple[mx.array, ...]:
        """Queries and keys (rotated to positions offset, offset + 1, ...) and values [B, heads, L,
        head_dim] for x [B, L, H]; then, with Qwen3.5's output gate, the gate [B, L, heads * head_dim]."""
        B, L, _ = x.shape
        q, k, v = project(self, _PROJECTIONS, self._sizes, x)
        q = q.reshape(B, L, self.n_heads, -1)
        if self.gated:
            q, gate = mx.split(q, 2, axis=-1)
        k = k.reshape(B, L, self.n_kv_heads, self.head_dim)
        v = v.reshape(B, L, self.n_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))
        q, k = self.rope(q, offset), self.rope(k, offset)
        return (q, k, v, gate.reshape(B, L, -1)) if self.gated else (q, k, v)

    def attend(self, q: mx.array, k: mx.array, v: mx.array, cache) -> mx.array:
        """The attention of `inputs`' queries over the cache (which takes its keys and values)."""
        if isinstance(cache, KVBatch):
            return mx.concatenate(
                [self._attend(q[i : i + 1], k[i : i + 1], v[i : i + 1], c) for i, c in enumerate(cache)]
            )
        return self._attend(q, k, v, cache)

    def output(self, out: mx.array, gate: mx.array | None = None) -> mx.array:
        """The layer's output from the attention [B, heads, L, head_dim] (and the gate)."""
        B, _, L, _ = out.shape
        out = out.transpose(0, 2, 1, 3).reshape(B, L, -1)
        if gate is not None:
            out = out * mx.sigmoid(gate)
        return self.o_proj(out)

    def _attend(self, q: mx.array, k: mx.array, v: mx.array, cache) -> mx.array:
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        mask = "causal" if q.shape[2] > 1 else None
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
