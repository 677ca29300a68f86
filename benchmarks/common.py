"""Shared pieces of the benchmarks: synthetic Qwen3.5-shaped and Qwen3 checkpoints in mlx-lm's
format (random weights, quantized or not), and a table printer."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from rich.console import Console
from rich.table import Table

from mlxqwen.config import parse_config
from mlxqwen.models import build_model

# short chat questions the demo model answers (and any model takes)
QUESTIONS = [
    "What is 12 + 30?",
    "Tell me about the moon.",
    "What is 345 + 678?",
    "Convert 5 km to meters.",
    "What is the capital of Japan?",
    "What is 91 - 17?",
    "Explain rain.",
    "What is 23 * 4?",
]


def _decoder(hidden: int, layers: int, vocab: int) -> dict:
    """What both families' configs share: sizes in proportion to `hidden`, Qwen's head counts."""
    return {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": hidden * 3,
        "num_hidden_layers": layers,
        "num_attention_heads": hidden // 128,
        "num_key_value_heads": max(1, hidden // 512),
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
    }


def qwen3_5_config(hidden: int, layers: int, vocab: int = 151936) -> dict:
    return {
        "model_type": "qwen3_5",
        "text_config": {
            "model_type": "qwen3_5_text",
            **_decoder(hidden, layers, vocab),
            "head_dim": 256,
            "linear_num_key_heads": hidden // 128,
            "linear_num_value_heads": hidden // 64,
            "linear_key_head_dim": 128,
            "linear_value_head_dim": 128,
            "linear_conv_kernel_dim": 4,
            "full_attention_interval": 4,
            "max_position_embeddings": 262144,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 1e7,
                "partial_rotary_factor": 0.25,
                "mrope_section": [11, 11, 10],
            },
        },
    }


def qwen3_config(hidden: int, layers: int, vocab: int = 151936) -> dict:
    return {
        "model_type": "qwen3",
        **_decoder(hidden, layers, vocab),
        "head_dim": 128,
        "max_position_embeddings": 40960,
        "rope_theta": 1e6,
    }


def write_checkpoint(path: Path, config: dict, bits: int | None = 4, group_size: int = 64, mtp: bool = False) -> Path:
    """Random weights in bf16, quantized like mlx-lm does (scales stored in bf16) unless bits is None,
    written in mlx-lm's format; with `mtp`, a random MTP head (`mtp.*`) too."""
    path.mkdir(parents=True, exist_ok=True)
    if mtp:
        config = {**config, "text_config": {**config["text_config"], "mtp_num_hidden_layers": 1}}
    model = build_model(parse_config(config), mtp=mtp)
    for layer in model.layers:
        if layer.is_linear:
            layer.linear_attn.A_log = mx.log(mx.random.uniform(1.0, 16.0, layer.linear_attn.A_log.shape))
    if bits is not None:
        nn.quantize(model, group_size, bits)
    weights = {
        k: v.astype(mx.bfloat16) if mx.issubdtype(v.dtype, mx.floating) and not k.endswith("A_log") else v
        for k, v in tree_flatten(model.parameters())
    }
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "mlx"})
    if bits is not None:
        config = {**config, "quantization": {"group_size": group_size, "bits": bits, "mode": "affine"}}
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path


def print_table(title: str, columns: list[str], rows: list[list]) -> None:
    table = Table(title=title)
    for c in columns:
        table.add_column(c, justify="right" if c != columns[0] else "left")
    for r in rows:
        table.add_row(*[f"{x:.2f}" if isinstance(x, float) else str(x) for x in r])
    console = Console()
    if not console.is_terminal:  # a file or a pipe: whole rows, not wrapped at 80 columns
        console.width = 240
    console.print(table)
