"""A checkpoint directory to an MLX model and its config: sanitized weights, quantized modules,
compute dtype, shape checks (`mlxqwen.load` adds the tokenizer, the sampling defaults and the
memory check: `mlxqwen.backends.mlx.load`)."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .checkpoint import read_config, read_weights
from .config import ModelConfig, parse_config
from .errors import ModelLoadError
from .models import build_model

# Parameters that lose accuracy outside fp32 (the decay exponent of Gated DeltaNet).
_KEEP_FP32 = ("A_log",)


def default_dtype() -> mx.Dtype:
    """bf16 on a GPU (Apple Silicon); fp32 on a CPU, where MLX's bf16 kernels are far slower."""
    return mx.bfloat16 if mx.default_device() == mx.gpu else mx.float32


def _quantize_for(model: nn.Module, cfg: ModelConfig, weights: dict[str, mx.array]) -> None:
    """Turn the modules that the checkpoint stores quantized into quantized modules."""
    q = cfg.mlx_quantization
    if not q:
        return
    defaults = {"group_size": q.get("group_size", 64), "bits": q.get("bits", 4), "mode": q.get("mode", "affine")}

    def predicate(path: str, module: nn.Module):
        if path in q:  # per-module override: a dict of params, or False
            return q[path] if isinstance(q[path], dict) else bool(q[path])
        return hasattr(module, "to_quantized") and f"{path}.scales" in weights

    nn.quantize(model, **defaults, class_predicate=predicate)


def cast_weights(weights: dict[str, mx.array], dtype: mx.Dtype) -> dict[str, mx.array]:
    return {
        k: v if not mx.issubdtype(v.dtype, mx.floating) or k.endswith(_KEEP_FP32) else v.astype(dtype)
        for k, v in weights.items()
    }


def check_weights(model: nn.Module, weights: dict[str, mx.array], origin: dict[str, Path], path: Path) -> None:
    expected = dict(tree_flatten(model.parameters()))
    missing = [k for k in expected if k not in weights]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise ModelLoadError(f"{path}: tensor {missing[0]!r}{more} missing from the checkpoint")
    for key, value in weights.items():
        if key not in expected:
            raise ModelLoadError(f"{origin.get(key, path)}: unexpected tensor {key!r} for this config")
        if value.shape != expected[key].shape:
            raise ModelLoadError(
                f"{origin.get(key, path)}: tensor {key!r} has shape {tuple(value.shape)}, "
                f"config.json implies {tuple(expected[key].shape)}"
            )


def load_model(path: str | Path, dtype: mx.Dtype | None = None, lazy: bool = False) -> tuple[nn.Module, ModelConfig]:
    path = Path(path).expanduser()
    if not path.is_dir():
        raise ModelLoadError(f"{path}: not a model directory")
    cfg = parse_config(read_config(path), str(path / "config.json"))
    model = build_model(cfg)
    raw, origin = read_weights(path)
    weights = model.sanitize(raw)
    _quantize_for(model, cfg, weights)
    check_weights(model, weights, origin, path)
    model.load_weights(list(cast_weights(weights, dtype or default_dtype()).items()))
    model.eval()
    if not lazy:
        mx.eval(model.parameters())
    return model, cfg
