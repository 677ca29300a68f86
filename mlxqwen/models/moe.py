"""Routed experts: all experts of a layer stored as one [E, out, in] tensor and applied
with gather_mm / gather_qmm, so a token only touches the weights of its top-k experts."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..config import ModelConfig
from .fused import fuse, project

_GATE_UP = ("gate_proj", "up_proj")


class SwitchLinear(nn.Module):
    def __init__(self, input_dims: int, output_dims: int, num_experts: int):
        super().__init__()
        self.weight = mx.zeros((num_experts, output_dims, input_dims))

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        return mx.gather_mm(x, self.weight.swapaxes(-1, -2), rhs_indices=indices, sorted_indices=sorted_indices)

    def to_quantized(self, group_size: int = 64, bits: int = 4, mode: str = "affine", **_) -> QuantizedSwitchLinear:
        return QuantizedSwitchLinear.from_switch_linear(self, group_size, bits, mode)


class QuantizedSwitchLinear(nn.Module):
    def __init__(self, input_dims: int, output_dims: int, num_experts: int, group_size: int, bits: int, mode: str):
        super().__init__()
        self.group_size, self.bits, self.mode = group_size, bits, mode
        w = mx.zeros((num_experts, output_dims, input_dims))
        self.weight, self.scales, *rest = mx.quantize(w, group_size, bits, mode=mode)
        if rest:
            self.biases = rest[0]
        self.freeze()

    @classmethod
    def from_switch_linear(cls, layer: SwitchLinear, group_size: int, bits: int, mode: str):
        E, out_dims, in_dims = layer.weight.shape
        q = cls(in_dims, out_dims, E, group_size, bits, mode)
        q.weight, q.scales, *rest = mx.quantize(layer.weight, group_size, bits, mode=mode)
        if rest:
            q.biases = rest[0]
        return q

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        return mx.gather_qmm(
            x,
            self.weight,
            self.scales,
            self.get("biases"),
            rhs_indices=indices,
            transpose=True,
            group_size=self.group_size,
            bits=self.bits,
            mode=self.mode,
            sorted_indices=sorted_indices,
        )


class SwitchGLU(nn.Module):
    def __init__(self, dims: int, hidden: int, num_experts: int):
        super().__init__()
        self.gate_proj = SwitchLinear(dims, hidden, num_experts)
        self.up_proj = SwitchLinear(dims, hidden, num_experts)
        self.down_proj = SwitchLinear(hidden, dims, num_experts)
        self._sizes = (hidden, hidden)

    def fuse(self) -> None:
        fuse(self, _GATE_UP)

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        # x [N, D], indices [N, k] -> [N, k, D]
        N, k = indices.shape
        x = x[:, None, None, :]
        # Grouping rows by expert makes each expert's weights stream once (prefill).
        sort = indices.size >= 64
        if sort:
            flat = indices.flatten()
            order = mx.argsort(flat)
            inverse = mx.argsort(order)
            x = x.flatten(0, -3)[order // k]
            indices = flat[order]
        gate, up = project(self, _GATE_UP, self._sizes, x, indices, sort)
        out = self.down_proj(nn.silu(gate) * up, indices, sort)
        if sort:
            out = out[inverse].reshape(N, k, 1, -1)
        return out.squeeze(-2)


class MLP(nn.Module):
    def __init__(self, dims: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dims, hidden, bias=False)
        self.up_proj = nn.Linear(dims, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dims, bias=False)
        self._sizes = (hidden, hidden)

    def fuse(self) -> None:
        fuse(self, _GATE_UP)

    def __call__(self, x: mx.array) -> mx.array:
        gate, up = project(self, _GATE_UP, self._sizes, x)
        return self.down_proj(nn.silu(gate) * up)


class SparseMoeBlock(nn.Module):
    """Top-k routing over `num_experts`; Qwen3.5-MoE adds a shared expert behind a sigmoid gate."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k, self.norm_topk_prob = cfg.num_experts_per_tok, cfg.norm_topk_prob
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.switch_mlp = SwitchGLU(cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts)
        if cfg.shared_expert_intermediate_size:
            self.shared_expert = MLP(cfg.hidden_size, cfg.shared_expert_intermediate_size)
            self.shared_expert_gate = nn.Linear(cfg.hidden_size, 1, bias=False)
        self.sum_over = None  # the group whose ranks each hold a part of the experts (`distributed.Tensor`)

    def __call__(self, x: mx.array) -> mx.array:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        probs = mx.softmax(self.gate(x).astype(mx.float32), axis=-1)
        k = self.top_k
        indices = mx.stop_gradient(mx.argpartition(-probs, kth=k - 1, axis=-1)[:, :k])
        scores = mx.take_along_axis(probs, indices, axis=-1)
        if self.norm_topk_prob:
            scores = scores / scores.sum(axis=-1, keepdims=True)
        y = (self.switch_mlp(x, indices) * scores[..., None].astype(x.dtype)).sum(axis=1)
        if "shared_expert" in self:
            y = y + mx.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        if self.sum_over is not None:
            y = mx.distributed.all_sum(y, group=self.sum_over)
        return y.reshape(shape)


def stack_experts(weights: dict[str, mx.array], prefix: str, num_experts: int) -> None:
    """Rewrite per-expert (`experts.N.gate_proj.weight`) or fused (`experts.gate_up_proj`)
    tensors under `prefix` (a layer's `...mlp`) into the `switch_mlp.*` layout, in place."""
    fused = f"{prefix}.experts.gate_up_proj"
    if fused in weights:
        gate_up = weights.pop(fused)
        half = gate_up.shape[-2] // 2
        weights[f"{prefix}.switch_mlp.gate_proj.weight"] = gate_up[..., :half, :]
        weights[f"{prefix}.switch_mlp.up_proj.weight"] = gate_up[..., half:, :]
        weights[f"{prefix}.switch_mlp.down_proj.weight"] = weights.pop(f"{prefix}.experts.down_proj")
        return
    for name in ("gate_proj", "up_proj", "down_proj"):
        for kind in ("weight", "scales", "biases"):
            keys = [f"{prefix}.experts.{e}.{name}.{kind}" for e in range(num_experts)]
            if keys[0] in weights:
                weights[f"{prefix}.switch_mlp.{name}.{kind}"] = mx.stack([weights.pop(k) for k in keys])
