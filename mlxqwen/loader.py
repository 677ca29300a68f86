"""A checkpoint directory to an MLX model and its config: sanitized weights, quantized modules,
compute dtype, shape checks (`mlxqwen.load` adds the tokenizer, the sampling defaults and the
memory check: `mlxqwen.backends.mlx.load`)."""

from __future__ import annotations

import logging
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .checkpoint import read_config, read_weights
from .config import ModelConfig, Yarn, parse_config, with_yarn
from .distributed import Placement
from .errors import ModelLoadError
from .models import build_model, fuse

# Parameters that lose accuracy outside fp32 (the decay exponent of Gated DeltaNet).
log = logging.getLogger("mlxqwen")

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


def _config(path: Path, yarn: Yarn | None) -> ModelConfig:
    if not path.is_dir():
        raise ModelLoadError(f"{path}: not a model directory")
    cfg = parse_config(read_config(path), str(path / "config.json"))
    return cfg if yarn is None else with_yarn(cfg, yarn)


def model_from_config(
    path: str | Path, dtype: mx.Dtype | None = None, yarn: Yarn | None = None
) -> tuple[nn.Module, ModelConfig]:
    """The model config.json describes, as `load_model` would hold it but without weights (what a
    user has before downloading them), for its size: an MLX model's `quantization` as our
    converter applies those bits, else unquantized in `dtype`."""
    path = Path(path).expanduser()
    cfg = _config(path, yarn)
    from mlxqwen.convert.mlx import planned_model

    q = cfg.mlx_quantization or {}
    recipe = f"{q['bits']}bit" if q else "none"
    try:
        return planned_model(cfg, recipe, q.get("group_size", 64), dtype), cfg
    except KeyError:
        raise ModelLoadError(f"{path / 'config.json'}: quantization bits={q['bits']} is not supported") from None


def _mtp_weights(
    path: Path, cfg: ModelConfig, weights: dict[str, mx.array], mtp: bool | str | Path
) -> tuple[dict[str, mx.array], dict[str, Path]]:
    """The multi-token-prediction head's tensors (`mtp.*`) that `mtp` asks for: True, the checkpoint's
    own; "auto", those if there are any; a path, a directory (or safetensors file) holding the head alone,
    named with or without `mtp.` (quantized, if at all, as the model is)."""
    if mtp is False:
        return {}, {}
    if isinstance(mtp, (str, Path)) and mtp != "auto":
        source = Path(mtp).expanduser()
        files = [source] if source.is_file() else sorted(source.glob("*.safetensors"))
        if not files:
            raise ModelLoadError(f"{source}: no MTP head (safetensors) there")
        head, origin = {}, {}
        for file in files:
            for key, value in mx.load(str(file)).items():
                name = key if key.startswith("mtp.") else f"mtp.{key}"
                head[name], origin[name] = value, file
    else:
        head = {k: v for k, v in weights.items() if k.startswith("mtp.")}
        origin = {}
        if not head and mtp is True:
            raise ModelLoadError(f"{path}: this checkpoint has no MTP head (mtp.* tensors)")
    if head and cfg.family != "qwen3_5":
        raise ModelLoadError(f"{path}: an MTP head needs a Qwen3.5-family model, not {cfg.model_type}")
    return head, origin


def _has_whole_head(model: nn.Module, weights: dict[str, mx.array]) -> bool:
    return all(f"mtp.{k}" in weights for k, _ in tree_flatten(model.mtp.parameters()))


def load_model(
    path: str | Path,
    dtype: mx.Dtype | None = None,
    lazy: bool = False,
    yarn: Yarn | None = None,
    mtp: bool | str | Path = False,
    fused: bool = True,
    placement: Placement | None = None,
) -> tuple[nn.Module, ModelConfig]:
    """A checkpoint directory as a model and its config. yarn: YaRN context extension. mtp: also
    Qwen3.5's multi-token-prediction head (see `_mtp_weights`); `model.mtp` holds it when loaded.
    fused: projections of the same input computed as one (`models.fuse`), for speed; False keeps
    the module tree, and so the parameter names, of the checkpoint (mlx-lm's). placement: only
    this rank's part of the model (see `mlxqwen.distributed`)."""
    path = Path(path).expanduser()
    cfg = _config(path, yarn)
    raw, origin = read_weights(path)
    head, head_origin = _mtp_weights(path, cfg, raw, mtp)
    model = build_model(cfg, mtp=bool(head))
    raw.update(head)
    origin.update(head_origin)
    weights = model.sanitize(raw)
    if head and mtp == "auto" and not _has_whole_head(model, weights):
        log.warning("%s: the checkpoint's MTP head is incomplete; loading the model without it", path)
        model = build_model(cfg)
        weights = {k: v for k, v in weights.items() if not k.startswith("mtp.")}
    if placement is not None:
        weights = placement.select(model, weights)
    _quantize_for(model, cfg, weights)
    check_weights(model, weights, origin, path)
    model.load_weights(list(cast_weights(weights, dtype or default_dtype()).items()))
    if placement is not None:
        placement.shard(model)  # before fusing: the sharded layers are the checkpoint's
    if fused:
        fuse(model)
    model.eval()
    if not lazy:
        mx.eval(model.parameters())
    return model, cfg
