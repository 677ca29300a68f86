"""A source checkpoint as lazy MLX arrays in our module tree's names and layouts, whatever its
kind: Hugging Face weights (bf16, fp16, fp32), Qwen's FP8 releases, or an MLX directory in
mlx-lm's quantized format. Quantized weights come out dequantized, so every output format
reads every source the same way (whether a format accepts an already quantized source is its
own choice).

Nothing is read here: MLX loads a tensor from its shard only when something that depends on
it is evaluated, so the converter (and the quality report) can walk a checkpoint larger than
memory one tensor (or one layer) at a time."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from mlxqwen.checkpoint import read_config, read_weights, safetensors_header
from mlxqwen.config import ModelConfig, parse_config
from mlxqwen.errors import ConvertError
from mlxqwen.loader import check_weights
from mlxqwen.models import build_model
from mlxqwen.models.moe import stack_experts

MTP_PREFIX = "mtp."
VISION_PREFIXES = ("model.visual.", "visual.", "vision_tower.")
_MTP_LAYER = re.compile(r"^mtp\.layers\.(\d+)\.")


@dataclass
class SourceCheckpoint:
    path: Path
    raw: dict[str, Any]  # config.json as written
    cfg: ModelConfig
    model: nn.Module  # the architecture, for sanitize and shape checks; its weights are never evaluated

    @classmethod
    def open(cls, path: Path) -> SourceCheckpoint:
        raw = read_config(path)
        cfg = parse_config(raw, str(path / "config.json"))
        return cls(path, raw, cfg, build_model(cfg))

    def tensors(self) -> tuple[dict[str, mx.array], dict[str, mx.array], dict[str, mx.array]]:
        """(decoder, mtp, vision): the decoder sanitized into our module tree (checked against the
        config); the MTP head in Hugging Face names with experts stacked like the decoder's; the
        vision tower as stored. FP8 weights come out dequantized in fp32, MLX-quantized ones in
        the dtype of their scales."""
        weights, origin = read_weights(self.path)
        if self.cfg.mlx_quantization:
            _dequantize_mlx(weights, self.cfg.mlx_quantization)
        _dequantize_fp8(weights, origin, self._fp8_block())
        mtp = {k: weights.pop(k) for k in [k for k in weights if k.startswith(MTP_PREFIX)]}
        vision = {k: weights.pop(k) for k in [k for k in weights if k.startswith(VISION_PREFIXES)]}
        decoder = self.model.sanitize(weights)
        check_weights(self.model, decoder, origin, self.path)
        if self.cfg.num_experts:
            for layer in sorted({int(m.group(1)) for k in mtp if (m := _MTP_LAYER.match(k))}):
                stack_experts(mtp, f"mtp.layers.{layer}.mlp", self.cfg.num_experts)
        return decoder, mtp, vision

    def _fp8_block(self) -> tuple[int, int]:
        block = (self.cfg.quantization or {}).get("weight_block_size") or (128, 128)
        return int(block[0]), int(block[1])


def _dequantize_mlx(weights: dict[str, mx.array], quantization: dict[str, Any]) -> None:
    """mlx-lm's packed weights (`weight`, `scales`, `biases`) back to one `weight` each, with the
    module's own group size and bits where the config overrides them."""
    defaults = {k: quantization[k] for k in ("group_size", "bits")} | {"mode": quantization.get("mode", "affine")}
    for scales in [k for k in weights if k.endswith(".scales")]:
        path = scales.removesuffix(".scales")
        override = quantization.get(path)
        params = {**defaults, **(override if isinstance(override, dict) else {})}
        weights[f"{path}.weight"] = mx.dequantize(
            weights[f"{path}.weight"], weights.pop(scales), weights.pop(f"{path}.biases", None), **params
        )


def dequantize_fp8(weight: mx.array, scale_inv: mx.array, block: tuple[int, int]) -> mx.array:
    """e4m3 weight [..., M, N] times its per-block inverse scale [..., ceil(M/bm), ceil(N/bn)], in fp32."""
    m, n = weight.shape[-2:]
    scale = mx.repeat(mx.repeat(scale_inv.astype(mx.float32), block[0], axis=-2), block[1], axis=-1)
    return mx.from_fp8(weight, dtype=mx.float32) * scale[..., :m, :n]


def _dequantize_fp8(weights: dict[str, mx.array], origin: dict[str, Path], block: tuple[int, int]) -> None:
    headers: dict[Path, dict] = {}
    for scale_key in [k for k in weights if k.endswith(".weight_scale_inv")]:
        key = scale_key.removesuffix("_scale_inv")
        if key not in weights:
            raise ConvertError(f"{origin[scale_key]}: {scale_key!r} has no matching {key!r}")
        file = origin[key]
        dtype = headers.setdefault(file, safetensors_header(file))[key]["dtype"]
        if dtype != "F8_E4M3":
            raise ConvertError(
                f"{file}: {key!r} is {dtype}; only e4m3 FP8 (F8_E4M3) block-scaled weights are supported"
            )
        weights[key] = dequantize_fp8(weights[key], weights.pop(scale_key), block)
