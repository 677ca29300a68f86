"""Gated delta rule for training on a CPU: transformers' chunked algorithm, with the
triangular solve of each chunk replaced by an explicit inverse.

transformers' reference (`torch_chunk_gated_delta_rule`) solves a unit lower-triangular system
per chunk with `torch.linalg.solve_triangular`, which on a CPU runs one small LAPACK call per
matrix and dominated training time. The inverse of I + A, for A strictly lower triangular
(hence nilpotent), is (I - A)(I + A^2)(I + A^4)...: a few batched matmuls. Same arguments and
results (to float rounding) as the reference, which tests/test_demo.py checks."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def unit_lower_inverse(a: torch.Tensor) -> torch.Tensor:
    """(I + a)^-1 for strictly lower-triangular a (batched)."""
    n = a.shape[-1]
    inverse = torch.eye(n, dtype=a.dtype, device=a.device) - a
    power, reach = a, 2
    while reach < n:
        power = power @ power
        inverse = inverse + inverse @ power
        reach *= 2
    return inverse


def chunk_gated_delta_rule(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    chunk_size: int = 32,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    **_,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """query/key [B, T, Hk, Dk], value [B, T, Hv, Dv], g (log decay) and beta [B, T, Hv]."""
    dtype = query.dtype
    b, t, k_heads, k_dim = key.shape
    v_heads, v_dim = value.shape[-2:]
    if k_heads != v_heads:  # each key head serves consecutive value heads
        query = query.repeat_interleave(v_heads // k_heads, dim=2)
        key = key.repeat_interleave(v_heads // k_heads, dim=2)
    query, key, value, beta, g = (x.transpose(1, 2).float() for x in (query, key, value, beta, g))
    if use_qk_l2norm_in_kernel:
        query = query * torch.rsqrt((query * query).sum(-1, keepdim=True) + 1e-6)
        key = key * torch.rsqrt((key * key).sum(-1, keepdim=True) + 1e-6)
    query = query * k_dim**-0.5

    pad = (chunk_size - t % chunk_size) % chunk_size
    query, key, value = (F.pad(x, (0, 0, 0, pad)) for x in (query, key, value))
    beta, g = F.pad(beta, (0, pad)), F.pad(g, (0, pad))
    n = (t + pad) // chunk_size
    q, k, v = (x.reshape(b, v_heads, n, chunk_size, x.shape[-1]) for x in (query, key, value))
    beta = beta.reshape(b, v_heads, n, chunk_size, 1)
    decay = g.reshape(b, v_heads, n, chunk_size).cumsum(-1)  # log decay from the chunk start

    future = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=q.device).triu(1)
    pairwise = (decay.unsqueeze(-1) - decay.unsqueeze(-2)).masked_fill(future, float("-inf")).exp()
    k_beta = k * beta
    inverse = unit_lower_inverse(((k_beta @ k.transpose(-1, -2)) * pairwise).tril(-1))
    new_values = inverse @ (v * beta)
    k_cumdecay = inverse @ (k_beta * decay.exp().unsqueeze(-1))
    attn = (q @ k.transpose(-1, -2)) * pairwise
    q = q * decay.exp().unsqueeze(-1)
    k = k * (decay[..., -1:] - decay).exp().unsqueeze(-1)
    chunk_decay = decay[..., -1].exp()[..., None, None]

    state = (
        torch.zeros(b, v_heads, k_dim, v_dim, dtype=q.dtype, device=q.device)
        if initial_state is None
        else initial_state.float()
    )
    outputs = []
    for i in range(n):
        v_new = new_values[:, :, i] - k_cumdecay[:, :, i] @ state
        outputs.append(q[:, :, i] @ state + attn[:, :, i] @ v_new)
        state = state * chunk_decay[:, :, i] + k[:, :, i].transpose(-1, -2) @ v_new
    out = torch.stack(outputs, 2).reshape(b, v_heads, -1, v_dim)[:, :, :t]
    return out.transpose(1, 2).contiguous().to(dtype), state if output_final_state else None
