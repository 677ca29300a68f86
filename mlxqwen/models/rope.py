"""Rotary position embeddings in the forms Qwen configs use: default, linear, YaRN,
partial rotary (only the first `dims` features rotate), and mRoPE, which for text
positions (equal on all three axes) reduces to plain 1-D RoPE."""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from ..config import RopeConfig


def _yarn_inv_freq(dims: int, rope: RopeConfig, max_positions: int) -> tuple[mx.array, float]:
    base, factor = rope.theta, rope.factor
    original = rope.original_max_position_embeddings or max_positions

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if rope.attention_factor is not None:
        attention = float(rope.attention_factor)
    elif rope.mscale and rope.mscale_all_dim:
        attention = mscale(factor, rope.mscale) / mscale(factor, rope.mscale_all_dim)
    else:
        attention = mscale(factor)

    def correction_dim(rotations: float) -> float:
        return dims * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dims - 1)
    if low == high:
        high += 0.001
    ramp = mx.clip((mx.arange(dims // 2, dtype=mx.float32) - low) / (high - low), 0, 1)
    extrapolation = 1.0 - ramp
    pos_freqs = base ** (mx.arange(0, dims, 2, dtype=mx.float32) / dims)
    inv_freq = (1.0 / (factor * pos_freqs)) * ramp + (1.0 / pos_freqs) * extrapolation
    return inv_freq, attention


class RoPE(nn.Module):
    def __init__(self, head_dim: int, rope: RopeConfig, max_positions: int):
        super().__init__()
        self.dims = int(head_dim * rope.partial_rotary_factor)
        self.base: float | None = rope.theta
        self.scale = 1.0 / rope.factor if rope.type == "linear" else 1.0
        self.attention_factor = 1.0
        self._freqs = None
        if rope.type == "yarn":
            inv_freq, self.attention_factor = _yarn_inv_freq(self.dims, rope, max_positions)
            self._freqs = 1.0 / inv_freq
            mx.eval(self._freqs)  # built here, used on the engine's thread, whose streams differ
            self.base = None

    def __call__(self, x: mx.array, offset: int = 0) -> mx.array:
        if self.attention_factor != 1.0:
            x = mx.concatenate([x[..., : self.dims] * self.attention_factor, x[..., self.dims :]], axis=-1)
        return mx.fast.rope(
            x, self.dims, traditional=False, base=self.base, scale=self.scale, offset=offset, freqs=self._freqs
        )
