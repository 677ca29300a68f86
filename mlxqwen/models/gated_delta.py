"""Gated DeltaNet, the linear-attention mixer of Qwen3.5 / Qwen3.6.

Per value head the layer keeps a Dk x Dv matrix S. For each token:
    S <- exp(g) * S;  S <- S + k (beta * (v - S^T k))^T;  out = S^T q
with q, k L2-normalised, g = -exp(A_log) * softplus(a + dt_bias) and beta = sigmoid(b).
The state is kept in fp32 whatever the weights' dtype.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..config import ModelConfig
from .fused import fuse, project


@mx.compile
def _step(state, q, k, v, g, beta):
    # state [B, H, Dk, Dv]; q, k [B, H, Dk]; v [B, H, Dv]; g, beta [B, H]
    state = state * mx.exp(g)[..., None, None]
    memory = (state * k[..., None]).sum(axis=-2)
    delta = (v - memory) * beta[..., None]
    state = state + k[..., None] * delta[..., None, :]
    return state, (state * q[..., None]).sum(axis=-2)


def _recurrent(q, k, v, g, beta, state, every_step: bool = False):
    """One token at a time; returns the outputs and the states [n, ...]: the state after every
    position (every_step) or the last one (n = 1)."""
    outs, states = [], []
    for t in range(q.shape[1]):
        state, out = _step(state, q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t])
        outs.append(out)
        if every_step:
            states.append(state)
    return mx.stack(outs, axis=1), mx.stack(states) if every_step else state[None]


def _chunked(q, k, v, g, beta, state, chunk: int = 64):
    """The same recurrence with chunks of `chunk` tokens as matmuls (the WY/UT form of DeltaNet):
    L / chunk sequential steps instead of L, which is what makes long prefills fast on a GPU."""
    B, L, H, Dk = q.shape
    pad = -L % chunk
    q, k, v = (mx.pad(t, [(0, 0), (0, pad), (0, 0), (0, 0)]).transpose(0, 2, 1, 3) for t in (q, k, v))
    g, beta = (mx.pad(t, [(0, 0), (0, pad), (0, 0)]).transpose(0, 2, 1) for t in (g, beta))
    n = (L + pad) // chunk
    q, k, v = (t.reshape(B, H, n, chunk, -1) for t in (q, k, v))
    g, beta = g.reshape(B, H, n, chunk), beta.reshape(B, H, n, chunk)

    cum = mx.cumsum(g, axis=-1)
    causal = mx.tril(mx.ones((chunk, chunk), dtype=mx.bool_))
    diff = cum[..., :, None] - cum[..., None, :]
    decay = mx.where(causal, mx.exp(mx.where(causal, diff, 0.0)), 0.0)
    k_beta = k * beta[..., None]
    # (I + A)^-1 for strictly lower-triangular A = (I - A)(I + A^2)(I + A^4)... since A^chunk = 0
    a = (k_beta @ k.swapaxes(-1, -2)) * decay * (1 - mx.eye(chunk))
    inverse, power = mx.eye(chunk) - a, a @ a
    for _ in range(chunk.bit_length() - 2):
        inverse = inverse + inverse @ power
        power = power @ power
    values = inverse @ (v * beta[..., None])
    keys_decayed = inverse @ (k_beta * mx.exp(cum)[..., None])
    attn = (q @ k.swapaxes(-1, -2)) * decay
    q = q * mx.exp(cum)[..., None]
    k = k * mx.exp(cum[..., -1:] - cum)[..., None]
    chunk_decay = mx.exp(cum[..., -1])[..., None, None]

    outs = []
    for i in range(n):
        v_new = values[:, :, i] - keys_decayed[:, :, i] @ state
        outs.append(q[:, :, i] @ state + attn[:, :, i] @ v_new)
        state = state * chunk_decay[:, :, i] + k[:, :, i].swapaxes(-1, -2) @ v_new
    out = mx.stack(outs, axis=2).reshape(B, H, n * chunk, -1)[:, :, :L]
    return out.transpose(0, 2, 1, 3), state


def gated_delta_rule(q, k, v, g, beta, state, chunk: int = 64, every_step: bool = False):
    """q, k [B, L, H, Dk]; v [B, L, H, Dv]; g, beta [B, L, H] (fp32). Returns out [B, L, H, Dv] and
    the final state [1, B, H, Dk, Dv], or with every_step the state after each position [L, ...]."""
    if every_step or q.shape[1] < chunk:
        return _recurrent(q, k, v, g, beta, state, every_step)
    out, state = _chunked(q, k, v, g, beta, state, chunk)
    return out, state[None]


def _l2norm(x: mx.array, eps: float = 1e-6) -> mx.array:
    return x * mx.rsqrt((x * x).sum(axis=-1, keepdims=True) + eps)


class GatedRMSNorm(nn.Module):
    """RMSNorm of the mixer output times silu(z); weight multiplies as is (no +1)."""

    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.eps = eps

    def __call__(self, x: mx.array, gate: mx.array) -> mx.array:
        return mx.fast.rms_norm(x, self.weight, self.eps) * nn.silu(gate)


_IN_PROJ = ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a")


class GatedDeltaNet(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_k_heads, self.n_v_heads = cfg.linear_num_key_heads, cfg.linear_num_value_heads
        self.k_dim, self.v_dim = cfg.linear_key_head_dim, cfg.linear_value_head_dim
        if self.n_v_heads % self.n_k_heads:
            raise ValueError("linear_num_value_heads must be a multiple of linear_num_key_heads")
        self.key_size = self.n_k_heads * self.k_dim
        self.value_size = self.n_v_heads * self.v_dim
        self.conv_dim = 2 * self.key_size + self.value_size
        self.kernel = cfg.linear_conv_kernel_dim
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, self.kernel, groups=self.conv_dim, bias=False)
        self.in_proj_qkv = nn.Linear(cfg.hidden_size, self.conv_dim, bias=False)
        self.in_proj_z = nn.Linear(cfg.hidden_size, self.value_size, bias=False)
        self.in_proj_b = nn.Linear(cfg.hidden_size, self.n_v_heads, bias=False)
        self.in_proj_a = nn.Linear(cfg.hidden_size, self.n_v_heads, bias=False)
        self.dt_bias = mx.ones((self.n_v_heads,))
        self.A_log = mx.zeros((self.n_v_heads,))
        self.norm = GatedRMSNorm(self.v_dim, cfg.rms_norm_eps)
        self.out_proj = nn.Linear(self.value_size, cfg.hidden_size, bias=False)
        self._in_sizes = (self.conv_dim, self.value_size, self.n_v_heads, self.n_v_heads)

    def fuse(self) -> None:
        fuse(self, _IN_PROJ)

    def _conv(self, padded: mx.array) -> mx.array:
        """Depthwise causal conv over the inputs [B, K-1+L, C] (the last K-1 inputs before these)."""
        L = padded.shape[1] - (self.kernel - 1)
        w = self.conv1d.weight[:, :, 0]  # [C, K]
        out = padded[:, 0:L] * w[:, 0]
        for i in range(1, self.kernel):
            out = out + padded[:, i : i + L] * w[:, i]
        return nn.silu(out)

    def state(self, cache, x: mx.array) -> tuple[mx.array, mx.array]:
        """The last kernel-1 conv inputs and the recurrent state that `cache` holds for the batch `x`
        (zeros before its first token, or without a cache)."""
        B = x.shape[0]
        past = cache.conv_state if cache is not None else None
        if past is None:
            past = mx.zeros((B, self.kernel - 1, self.conv_dim), x.dtype)
        state = cache.recurrent_state if cache is not None else None
        if state is None:
            state = mx.zeros((B, self.n_v_heads, self.k_dim, self.v_dim), mx.float32)
        return past, state

    def __call__(self, x: mx.array, past: mx.array, state: mx.array, every_step: bool = False):
        """The output for x [B, L, H] after the conv inputs `past` and recurrent `state` (see `state`),
        the conv inputs (past, then x's) and the recurrent state after x [1, ...] (every_step: after
        each of its positions [L, ...]), as `LinearAttentionCache.update` takes them."""
        B, L, _ = x.shape
        inputs, z, b, a = project(self, _IN_PROJ, self._in_sizes, x)
        padded = mx.concatenate([past, inputs], axis=1)
        mixed = self._conv(padded)
        q, k, v = mx.split(mixed, [self.key_size, 2 * self.key_size], axis=-1)
        q = _l2norm(q.reshape(B, L, self.n_k_heads, self.k_dim).astype(mx.float32)) * self.k_dim**-0.5
        k = _l2norm(k.reshape(B, L, self.n_k_heads, self.k_dim).astype(mx.float32))
        v = v.reshape(B, L, self.n_v_heads, self.v_dim).astype(mx.float32)
        if self.n_v_heads != self.n_k_heads:
            groups = self.n_v_heads // self.n_k_heads
            q, k = mx.repeat(q, groups, axis=2), mx.repeat(k, groups, axis=2)
        beta = mx.sigmoid(b.astype(mx.float32))
        g = -mx.exp(self.A_log.astype(mx.float32)) * nn.softplus(a.astype(mx.float32) + self.dt_bias.astype(mx.float32))
        out, states = gated_delta_rule(q, k, v, g, beta, state, every_step=every_step)
        z = z.reshape(B, L, self.n_v_heads, self.v_dim)
        out = self.norm(out.astype(x.dtype), z)
        return self.out_proj(out.reshape(B, L, -1)), padded, states
