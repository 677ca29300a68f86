"""Output format `mlx`: a directory in mlx-lm's layout that `mlxqwen.load` and `mlx_lm.load` read.

The source is walked one tensor at a time: each is read (lazily, from its shard), sanitized
into our module tree, cast to the output dtype, quantized with `mx.quantize` and handed to the
shard writer, which keeps at most one output shard in memory. A quantized tensor is therefore
exactly `mx.quantize(source_tensor.astype(dtype), group_size, bits)`, where `dtype` is the
output dtype of unquantized tensors (FP8 weights are dequantized in fp32 first)."""

from __future__ import annotations

import json
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from rich.progress import Progress

from mlxqwen.config import ModelConfig
from mlxqwen.errors import ConvertError, option
from mlxqwen.loader import cast_weights, default_dtype
from mlxqwen.models import build_model

from . import budget, rounding
from .card import write_card
from .format import ConvertResult, Option, OutputFormat
from .output import check_free_space, staged
from .progress import add_task, bytes_done
from .quality import calibration_tokens, evaluate
from .reader import SourceCheckpoint
from .recipes import DEFAULT_RECIPE, GROUP_SIZES, RECIPES, Quant, quantized_bytes
from .shards import ShardWriter
from .source import Source

DTYPES = ("bfloat16", "float16", "float32")

# Files copied from the source next to the weights.
COPY_PATTERNS = (
    "tokenizer*",
    "vocab.*",
    "merges.txt",
    "added_tokens.json",
    "special_tokens_map.json",
    "*.tiktoken",
    "chat_template*",
    "generation_config.json",
    "LICENSE*",
)
VISION_FILES = ("preprocessor_config.json", "video_preprocessor_config.json")
# mlx-lm has no text-only module for these; the multimodal model_type reads the same
# text model from `text_config`.
_TEXT_ONLY_PARENT = {"qwen3_5_text": "qwen3_5", "qwen3_5_moe_text": "qwen3_5_moe"}
_TOP_LEVEL = (
    "architectures",
    "tie_word_embeddings",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "dtype",
    "torch_dtype",
)


class MlxFormat(OutputFormat):
    name = "mlx"
    options = {
        "recipe": Option(f"quantization recipe (default {DEFAULT_RECIPE})", choices=tuple(RECIPES)),
        "group_size": Option("quantization group size (default 64)", type=int, choices=GROUP_SIZES),
        "target_bpw": Option(
            "instead of a recipe: fill this many bits per weight (e.g. 4.5), bits and group size chosen per tensor "
            "from the KL each costs on calibration text",
            type=float,
        ),
        "fit": Option("instead of a recipe: the most bits that fit this memory (e.g. 16GB) at --context", type=str),
        "context": Option("context --fit must leave room for, tokens (default 32768)", 32768, int),
        "calibration": Option("UTF-8 text to calibrate on (default: the built-in chats)", type=str),
        "seed": Option("seed of the calibration's random draws (default 0)", 0, int),
        "rounding": Option(
            "with a budget: scales fitted to the calibration's activations, or plain round-to-nearest "
            "(default activation)",
            "activation",
            choices=("activation", "nearest"),
        ),
        "dtype": Option("dtype of the unquantized tensors (default: the source's)", choices=DTYPES),
        "vision": Option("copy the vision tower, unquantized (dropped by default)", False, switch=True),
        "shard_size": Option("largest output shard, GB (default 5)", 5.0, float),
        "eval": Option("measure KL divergence, top-1 agreement and perplexity against the source", False, switch=True),
    }

    def label(self, options: dict[str, Any]) -> str:
        if options["target_bpw"] is not None:
            return f"{options['target_bpw']:g}bpw"
        if options["fit"] is not None:
            return f"fit{options['fit'].replace(' ', '')}"
        recipe, group_size = options["recipe"] or DEFAULT_RECIPE, options["group_size"] or 64
        return recipe if group_size == 64 or recipe == "none" else f"{recipe}-g{group_size}"

    def check(self, options: dict[str, Any]) -> None:
        if options["shard_size"] <= 0:
            raise ConvertError(f"{option('shard_size', options['shard_size'])}: must be a positive number of GB")
        budget.check(options)

    def default_output(self, name: str, options: dict[str, Any]) -> str:
        return f"{name}-{self.label(options)}"

    def convert(
        self, source: Source, output: Path, options: dict[str, Any], *, force: bool, progress: Progress | None
    ) -> ConvertResult:
        start = time.perf_counter()
        recipe, group_size = options["recipe"] or DEFAULT_RECIPE, options["group_size"] or 64
        vision = options["vision"]
        budgeted = options["target_bpw"] is not None or options["fit"] is not None
        checkpoint = SourceCheckpoint.open(source.path)
        if checkpoint.cfg.mlx_quantization:
            raise ConvertError(
                f"{source.path / 'config.json'}: checkpoint is already quantized (MLX); convert the bf16 or FP8 "
                "release, or run this one as it is"
            )
        # fails before converting when the tokenizer does not fit the model
        tokens = calibration_tokens(source.path, checkpoint.cfg.vocab_size) if options["eval"] else []
        out_dtype = getattr(mx, options["dtype"] or _source_dtype(checkpoint.cfg))
        decoder, mtp, vision_tower = checkpoint.tensors()
        sensitivity, importance = None, {}
        if budgeted:
            quants, sensitivity, importance = budget.plan(checkpoint, decoder, mtp, options, out_dtype, progress)
            if options["rounding"] == "nearest":
                importance = {}
            default = Counter(quants.values()).most_common(1)[0][0]
        else:
            shapes = {name: v.shape for name, v in {**decoder, **mtp}.items()}
            quants = {
                n: (b, group_size) for n, b in tensor_bits(shapes, checkpoint.cfg, recipe, group_size).items() if b
            }
            default = (RECIPES[recipe].bits, group_size)
        tensors = {**decoder, **mtp, **(vision_tower if vision else {})}
        del decoder, mtp, vision_tower  # the loop below must hold the only reference to each tensor
        tensors = cast_weights(tensors, out_dtype)
        quantization = {"group_size": default[1], "bits": default[0], "mode": "affine"}
        for name, q in quants.items():
            if q != default:
                quantization[name.removesuffix(".weight")] = {"group_size": q[1], "bits": q[0], "mode": "affine"}

        with staged(output, force, source.path) as tmp:
            tmp.mkdir()
            check_free_space(tmp.parent, _output_bytes(tensors, quants))
            writer = ShardWriter(tmp, int(options["shard_size"] * 2**30))
            total = sum(v.nbytes for v in tensors.values())
            task = add_task(progress, f"convert {source.name}", total) if progress is not None else None
            params = done = 0
            for name in list(tensors):
                value = tensors.pop(name)
                if name in quants:
                    path = name.removesuffix(".weight")
                    bits, group = quants[name]
                    if name in importance:
                        packed = rounding.quantize(value, importance.pop(name), group, bits)
                    else:
                        packed = mx.quantize(value, group, bits)
                    arrays = dict(zip((f"{path}.weight", f"{path}.scales", f"{path}.biases"), packed, strict=True))
                else:
                    arrays = {name: value}
                mx.eval(*arrays.values())
                for key, array in arrays.items():
                    writer.add(key, array)
                params, done = params + value.size, done + value.nbytes
                del value, arrays
                if task is not None:
                    progress.update(task, completed=done, info=bytes_done(done, total))
            files = writer.finish()
            config = output_config(checkpoint.raw, quantization if quants else None, vision, out_dtype)
            (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
            _copy_files(source.path, tmp, vision)
            bits_per_weight = writer.total_bytes * 8 / params
            quality = evaluate(checkpoint, tmp, tokens, progress) if options["eval"] else None
            if budgeted:
                description = f"`{self.label(options)}`: bits and group size per tensor, chosen by measured sensitivity"
            else:
                description = f"`{self.label(options)}`: {RECIPES[recipe].description}"
                description += f", group size {group_size}" if quants else ""
            description += f"; unquantized tensors in {_dtype_name(out_dtype)}"
            write_card(
                tmp,
                output.name,
                source,
                description,
                writer.total_bytes,
                len(files),
                bits_per_weight,
                quality,
                sensitivity,
                quants,
            )
        return ConvertResult(
            output=output,
            recipe=self.label(options),
            size_bytes=writer.total_bytes,
            bits_per_weight=bits_per_weight,
            seconds=time.perf_counter() - start,
            quality=quality,
        )


MLX = MlxFormat()


def tensor_bits(shapes: dict[str, tuple[int, ...]], cfg: ModelConfig, recipe: str, group_size: int) -> dict[str, int]:
    """The bits `recipe` gives each tensor (0: left unquantized), by our module tree's names."""
    plan = RECIPES[recipe]
    return {name: plan.bits_for(name, shape, group_size, cfg.num_hidden_layers) for name, shape in shapes.items()}


def planned_model(
    cfg: ModelConfig, recipe: str = DEFAULT_RECIPE, group_size: int = 64, dtype: mx.Dtype | None = None
) -> nn.Module:
    """The decoder as `recipe` would convert it, built lazily from the config alone (no weight is
    read or computed) and computing in `dtype` (default: this machine's): what a memory estimate
    needs before anything is downloaded."""
    model = build_model(cfg)
    model.load_weights(list(cast_weights(dict(tree_flatten(model.parameters())), dtype or default_dtype()).items()))
    shapes = {name: value.shape for name, value in tree_flatten(model.parameters())}
    bits = tensor_bits(shapes, cfg, recipe, group_size)

    def quantized(path: str, module: nn.Module):
        b = bits.get(f"{path}.weight", 0) if hasattr(module, "to_quantized") else 0
        return {"group_size": group_size, "bits": b, "mode": "affine"} if b else False

    nn.quantize(model, class_predicate=quantized)
    return model


def _dtype_name(dtype: mx.Dtype) -> str:
    return str(dtype).removeprefix("mlx.core.")


def _source_dtype(cfg: ModelConfig) -> str:
    return cfg.dtype if cfg.dtype in DTYPES else "bfloat16"


def _output_bytes(tensors: dict[str, mx.array], quants: dict[str, Quant]) -> int:
    return sum(quantized_bytes(v.shape, quants[n], v.itemsize) if n in quants else v.nbytes for n, v in tensors.items())


def output_config(raw: dict[str, Any], quantization: dict | None, vision: bool, dtype: mx.Dtype) -> dict[str, Any]:
    config = {k: v for k, v in raw.items() if k not in ("quantization", "quantization_config", "_name_or_path")}
    if not vision:
        config.pop("vision_config", None)
    if isinstance(config.get("text_config"), dict):
        config["text_config"] = {k: v for k, v in config["text_config"].items() if k != "quantization_config"}
    for section in (config, config.get("text_config") or {}):
        for key in ("dtype", "torch_dtype"):
            if key in section:
                section[key] = _dtype_name(dtype)
    _add_transformers4_fields(config.get("text_config") or config)
    if config.get("model_type") in _TEXT_ONLY_PARENT:
        top = {k: config[k] for k in _TOP_LEVEL if k in config}
        config = {**top, "model_type": _TEXT_ONLY_PARENT[config["model_type"]], "text_config": config}
    if quantization:
        config["quantization"] = quantization
        config["quantization_config"] = quantization  # the key Hugging Face tools look for (mlx-lm writes both)
    return config


def _add_transformers4_fields(text: dict[str, Any]) -> None:
    """transformers 5 writes `rope_parameters` and `num_local_experts`; mlx-lm's qwen2 and
    qwen3_moe read only `rope_theta` / `rope_scaling` / `num_experts` (qwen2 silently falls back
    to its own theta). Write both forms. mlx-lm's qwen3_5 places attention layers by
    `full_attention_interval` alone (default 4), which transformers 5 leaves out when it writes
    `layer_types`: derive it where the layer types are periodic."""
    types = text.get("layer_types")
    if types and "full_attention_interval" not in text and "full_attention" in types:
        interval = types.index("full_attention") + 1
        if all((t == "full_attention") == ((i + 1) % interval == 0) for i, t in enumerate(types)):
            text["full_attention_interval"] = interval
    if "num_local_experts" in text and "num_experts" not in text:
        text["num_experts"] = text["num_local_experts"]
    params = text.get("rope_parameters")
    if not isinstance(params, dict) or "rope_theta" not in params or "rope_theta" in text:
        return
    text["rope_theta"] = params["rope_theta"]
    if params.get("rope_type", "default") != "default" and "rope_scaling" not in text:
        text["rope_scaling"] = {k: v for k, v in params.items() if k != "rope_theta"}


def _copy_files(source: Path, directory: Path, vision: bool) -> None:
    patterns = COPY_PATTERNS + (VISION_FILES if vision else ())
    for pattern in patterns:
        for file in source.glob(pattern):
            if file.is_file():
                shutil.copy(file, directory / file.name)
