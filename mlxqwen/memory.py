"""Will a model fit? Weights + K/V cache + recurrent state + working memory, against this
machine's memory.

Weights are counted exactly from the model as loaded (lazily, so nothing is read yet):
after dtype casting and quantization, with MTP and vision tensors dropped. The K/V cache grows with
the context; Gated DeltaNet layers hold a fixed state whatever the length. Working memory
is the largest transient of a prefill chunk at full context: attention scores (chunk x
heads x context, fp32, as with any kernel that materializes them), the MLP activations,
a dequantized layer of a quantized K/V cache, and a fixed runtime allowance.

The budget is Metal's recommended working set on a Mac GPU (what macOS lets the GPU
wire), else 85 % of physical memory (the rest is the system's)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .config import ModelConfig

GiB = 1024**3
_RUNTIME = GiB // 2  # interpreter, MLX, tokenizer, allocator slack
_TIGHT = 0.9  # above this share of the budget a model fits only with everything else closed


def total_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def memory_budget() -> int:
    """Bytes a model may use on this machine."""
    if mx.default_device() == mx.gpu and mx.metal.is_available():
        return int(mx.device_info()["max_recommended_working_set_size"])
    return int(total_memory() * 0.85)


@dataclass(frozen=True)
class MemoryEstimate:
    context: int
    weights: int
    kv_cache: int
    recurrent_state: int
    working: int
    budget: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.recurrent_state + self.working

    @property
    def fits(self) -> bool:
        return self.total <= self.budget

    @property
    def verdict(self) -> str:
        need, have = self.total / GiB, self.budget / GiB
        if not self.fits:
            return f"does not fit: needs {need:.1f} GiB, this machine allows {have:.1f} GiB"
        if self.total > _TIGHT * self.budget:
            return f"fits, tightly: {need:.1f} of {have:.1f} GiB; close other applications"
        return f"fits: {need:.1f} of {have:.1f} GiB"


def _attention_layers(cfg: ModelConfig) -> int:
    if not cfg.layer_types:
        return cfg.num_hidden_layers
    return sum(t != "linear_attention" for t in cfg.layer_types)


def _kv_bytes_per_token(cfg: ModelConfig, dtype: mx.Dtype, kv_bits: int | None, kv_group_size: int) -> float:
    per_vector = cfg.head_dim * dtype.size
    if kv_bits:  # packed values, plus a scale and a bias per group
        per_vector = cfg.head_dim * kv_bits / 8 + 2 * (cfg.head_dim // kv_group_size) * dtype.size
    return _attention_layers(cfg) * 2 * cfg.num_key_value_heads * per_vector


def _recurrent_bytes(cfg: ModelConfig, dtype: mx.Dtype) -> int:
    layers = cfg.num_hidden_layers - _attention_layers(cfg)
    conv_dim = (
        2 * cfg.linear_num_key_heads * cfg.linear_key_head_dim + cfg.linear_num_value_heads * cfg.linear_value_head_dim
    )
    conv = (cfg.linear_conv_kernel_dim - 1) * conv_dim * dtype.size
    state = cfg.linear_num_value_heads * cfg.linear_key_head_dim * cfg.linear_value_head_dim * 4  # fp32
    return layers * (conv + state)


def weight_bytes(model: nn.Module) -> int:
    return sum(p.nbytes for _, p in tree_flatten(model.parameters()))


def estimate(
    cfg: ModelConfig,
    context: int,
    *,
    weights: int,
    dtype: mx.Dtype,
    kv_bits: int | None = None,
    kv_group_size: int = 64,
    prefill_chunk: int = 512,
    budget: int | None = None,
) -> MemoryEstimate:
    """Memory to run a model with up to `context` tokens.
    weights: bytes of its parameters (`weight_bytes`); dtype: the compute dtype (activations, K/V)."""
    slots = -(-context // 256) * 256  # the K/V cache grows in blocks of 256 positions
    chunk = min(prefill_chunk, max(context, 1))
    mlp = max(cfg.intermediate_size, cfg.moe_intermediate_size * cfg.num_experts_per_tok)
    working = (
        chunk * cfg.num_attention_heads * slots * 4
        + 3 * chunk * mlp * dtype.size
        + (2 * slots * cfg.num_key_value_heads * cfg.head_dim * dtype.size if kv_bits else 0)
        + _RUNTIME
    )
    return MemoryEstimate(
        context=context,
        weights=weights,
        kv_cache=int(slots * _kv_bytes_per_token(cfg, dtype, kv_bits, kv_group_size)),
        recurrent_state=_recurrent_bytes(cfg, dtype),
        working=working,
        budget=memory_budget() if budget is None else budget,
    )


def largest_context(cfg: ModelConfig, **kwargs) -> int:
    """The longest context (a multiple of 256, at most the model's own) that fits; 0 if none."""
    lo, hi = 0, cfg.max_position_embeddings // 256
    while lo < hi:  # estimates grow with the context: binary search over blocks of 256
        mid = (lo + hi + 1) // 2
        if estimate(cfg, mid * 256, **kwargs).fits:
            lo = mid
        else:
            hi = mid - 1
    return lo * 256
