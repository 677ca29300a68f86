"""Model configuration: one normalized view of every Qwen config.json we accept.

Hugging Face writes these files in two styles (transformers 4: `rope_theta`,
`rope_scaling`, `num_experts`; transformers 5: `rope_parameters`,
`num_local_experts`, `layer_types`) and nests the text model of multimodal
checkpoints under `text_config`. Everything downstream reads `ModelConfig` only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from .errors import ModelLoadError, option

# config.json model_type -> architecture family implemented in mlxqwen.models
MODEL_TYPES = {
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "qwen3_moe": "qwen3_moe",
    "qwen3_5": "qwen3_5",
    "qwen3_5_text": "qwen3_5",
    "qwen3_5_moe": "qwen3_5",
    "qwen3_5_moe_text": "qwen3_5",
}

ROPE_TYPES = ("default", "linear", "yarn", "mrope")


@dataclass
class RopeConfig:
    theta: float = 10000.0
    type: str = "default"
    partial_rotary_factor: float = 1.0
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True
    mrope_section: list[int] = field(default_factory=list)  # text-only input reduces mRoPE to 1-D


@dataclass
class ModelConfig:
    model_type: str
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    max_position_embeddings: int
    rope: RopeConfig
    attention_bias: bool = False
    # MoE
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    # Qwen3.5 hybrid layers
    layer_types: list[str] = field(default_factory=list)
    linear_num_key_heads: int = 0
    linear_num_value_heads: int = 0
    linear_key_head_dim: int = 0
    linear_value_head_dim: int = 0
    linear_conv_kernel_dim: int = 4
    # How the checkpoint stores its weights: `quantization` is mlx-lm's section (bits, group
    # size, per-module overrides) or a Hugging Face `quantization_config` (FP8's: `quant_method`
    # "fp8"), None when the weights are plain; `dtype` is what config.json names ("bfloat16", ...).
    quantization: dict[str, Any] | None = None
    dtype: str | None = None
    mtp_layers: int = 0  # multi-token-prediction layers of the checkpoint (Qwen3.5's `mtp.*`)
    # The config.json as written, for tools that copy or extend it (converter).
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def mlx_quantization(self) -> dict[str, Any] | None:
        """The quantization section when the weights are packed by `mx.quantize` (mlx-lm's format)."""
        return self.quantization if self.quantization and "bits" in self.quantization else None

    def is_moe_layer(self, index: int) -> bool:
        if self.num_experts <= 0 or index in self.mlp_only_layers:
            return False
        return (index + 1) % self.decoder_sparse_step == 0


def _rope_from(text: dict[str, Any], source: str) -> RopeConfig:
    params = dict(text.get("rope_parameters") or {})
    scaling = text.get("rope_scaling") or {}
    if isinstance(params.get("full_attention"), dict):  # nested per layer type
        params = dict(params["full_attention"])
    merged = {**scaling, **params}
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ModelLoadError(f"{source}: rope type {rope_type!r} is not supported (expected one of {ROPE_TYPES})")
    theta = merged.get("rope_theta", text.get("rope_theta"))
    if theta is None:
        theta = 10000.0
    partial = merged.get("partial_rotary_factor", text.get("partial_rotary_factor", 1.0))
    return RopeConfig(
        theta=float(theta),
        type="default" if rope_type == "mrope" else rope_type,
        partial_rotary_factor=float(partial),
        factor=float(merged.get("factor") or 1.0),
        original_max_position_embeddings=merged.get(
            "original_max_position_embeddings", text.get("original_max_position_embeddings")
        ),
        beta_fast=float(merged.get("beta_fast") or 32.0),
        beta_slow=float(merged.get("beta_slow") or 1.0),
        attention_factor=merged.get("attention_factor"),
        mscale=merged.get("mscale"),
        mscale_all_dim=merged.get("mscale_all_dim"),
        truncate=bool(merged.get("truncate", True)),
        mrope_section=[int(n) for n in merged.get("mrope_section") or []],
    )


def _require(d: dict[str, Any], key: str, source: str) -> Any:
    if key not in d or d[key] is None:
        raise ModelLoadError(f"{source}: missing field {key!r}")
    return d[key]


def parse_config(raw: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """Normalize a Hugging Face (or mlx-lm) config.json dict."""
    model_type = raw.get("model_type")
    if not model_type:
        raise ModelLoadError(f"{source}: missing field 'model_type'")
    if model_type not in MODEL_TYPES:
        raise ModelLoadError(
            f"{source}: model_type {model_type!r} is not supported (supported: {', '.join(MODEL_TYPES)})"
        )
    family = MODEL_TYPES[model_type]
    text = dict(raw.get("text_config") or raw)
    if "tie_word_embeddings" not in text and "tie_word_embeddings" in raw:
        text["tie_word_embeddings"] = raw["tie_word_embeddings"]

    hidden = int(_require(text, "hidden_size", source))
    heads = int(_require(text, "num_attention_heads", source))
    layers = int(_require(text, "num_hidden_layers", source))
    rope = _rope_from(text, source)
    if family == "qwen3_5" and "partial_rotary_factor" not in {
        **(text.get("rope_parameters") or {}),
        **text,
    }:
        rope.partial_rotary_factor = 0.25  # transformers' default for this family

    num_experts = int(text.get("num_experts") or text.get("num_local_experts") or 0)
    layer_types = list(text.get("layer_types") or [])
    if family == "qwen3_5" and not layer_types:
        interval = int(text.get("full_attention_interval", 4))
        layer_types = ["full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(layers)]
    if layer_types and len(layer_types) != layers:
        raise ModelLoadError(f"{source}: layer_types has {len(layer_types)} entries for {layers} layers")

    cfg = ModelConfig(
        model_type=model_type,
        family=family,
        vocab_size=int(_require(text, "vocab_size", source)),
        hidden_size=hidden,
        intermediate_size=int(text.get("intermediate_size") or 0),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=int(text.get("num_key_value_heads") or heads),
        head_dim=int(text.get("head_dim") or hidden // heads),
        rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(text.get("tie_word_embeddings", False)),
        max_position_embeddings=int(text.get("max_position_embeddings") or 32768),
        rope=rope,
        attention_bias=family == "qwen2" or bool(text.get("attention_bias", False)),
        num_experts=num_experts,
        num_experts_per_tok=int(text.get("num_experts_per_tok") or 0),
        moe_intermediate_size=int(text.get("moe_intermediate_size") or 0),
        shared_expert_intermediate_size=int(text.get("shared_expert_intermediate_size") or 0),
        norm_topk_prob=family == "qwen3_5" or bool(text.get("norm_topk_prob", False)),
        decoder_sparse_step=int(text.get("decoder_sparse_step") or 1),
        mlp_only_layers=list(text.get("mlp_only_layers") or []),
        layer_types=layer_types,
        linear_num_key_heads=int(text.get("linear_num_key_heads") or 0),
        linear_num_value_heads=int(text.get("linear_num_value_heads") or 0),
        linear_key_head_dim=int(text.get("linear_key_head_dim") or 0),
        linear_value_head_dim=int(text.get("linear_value_head_dim") or 0),
        linear_conv_kernel_dim=int(text.get("linear_conv_kernel_dim") or 4),
        quantization=raw.get("quantization") or raw.get("quantization_config") or text.get("quantization_config"),
        dtype=next((d for d in (raw.get(k) or text.get(k) for k in ("dtype", "torch_dtype")) if d), None),
        mtp_layers=int(text.get("mtp_num_hidden_layers") or 0),
        raw=raw,
    )
    if cfg.num_attention_heads % cfg.num_key_value_heads:
        raise ModelLoadError(f"{source}: num_attention_heads must be a multiple of num_key_value_heads")
    if cfg.num_experts and not cfg.num_experts_per_tok:
        raise ModelLoadError(f"{source}: missing field 'num_experts_per_tok'")
    return cfg


@dataclass(frozen=True)
class Yarn:
    """Context extension by YaRN rope scaling, as Qwen documents it: positions up to
    `factor` x `original` tokens (`original`: the context the model was trained for;
    None: its max_position_embeddings)."""

    factor: float
    original: int | None = None


def parse_yarn(rope_scaling: Mapping[str, Any] | None) -> Yarn | None:
    """`rope_scaling` in Qwen's form, {"rope_type": "yarn", "factor": 4.0,
    "original_max_position_embeddings": 32768} (the last is optional), or None."""
    if rope_scaling is None:
        return None
    example = '{"rope_type": "yarn", "factor": 4.0}'
    if not isinstance(rope_scaling, Mapping):
        raise ValueError(f"rope_scaling={rope_scaling!r}: expected a mapping such as {example}")
    kind = rope_scaling.get("rope_type", rope_scaling.get("type"))
    unknown = set(rope_scaling) - {"rope_type", "type", "factor", "original_max_position_embeddings"}
    if kind != "yarn" or unknown:
        what = f"unknown key {sorted(unknown)[0]!r}" if unknown else f"rope type {kind!r}"
        raise ValueError(f"rope_scaling: {what}; context extension takes YaRN, e.g. {example}")
    factor, original = rope_scaling.get("factor"), rope_scaling.get("original_max_position_embeddings")
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 1:
        raise ValueError(f"rope_scaling: factor={factor!r}; give a number above 1, e.g. {example}")
    if original is not None and (isinstance(original, bool) or not isinstance(original, int) or original < 1):
        raise ValueError(f"rope_scaling: original_max_position_embeddings={original!r}; give a positive integer")
    return Yarn(float(factor), original)


def with_yarn(cfg: ModelConfig, yarn: Yarn) -> ModelConfig:
    """The config with YaRN rope scaling; max_position_embeddings becomes the extended context."""
    original = yarn.original or cfg.max_position_embeddings
    rope = replace(cfg.rope, type="yarn", factor=yarn.factor, original_max_position_embeddings=original)
    return replace(cfg, rope=rope, max_position_embeddings=int(original * yarn.factor))


def context_limit(cfg: ModelConfig) -> int:
    """The longest context the model handles: its own, or what its YaRN scaling extends it to."""
    if cfg.rope.type != "yarn":
        return cfg.max_position_embeddings
    original = cfg.rope.original_max_position_embeddings or cfg.max_position_embeddings
    return max(cfg.max_position_embeddings, math.floor(original * cfg.rope.factor))


def trained_context(cfg: ModelConfig) -> int:
    """The context the model was trained for (before any YaRN scaling)."""
    if cfg.rope.type == "yarn" and cfg.rope.original_max_position_embeddings:
        return cfg.rope.original_max_position_embeddings
    return cfg.max_position_embeddings


def yarn_hint(requested: int, trained: int) -> str:
    """How to ask for `requested` tokens of a model trained for `trained`: the YaRN option."""
    factor = math.ceil(requested / trained * 10) / 10
    return "extend it with YaRN: " + option(
        "rope_scaling", f'{{"rope_type": "yarn", "factor": {factor}}}', literal=True
    )
