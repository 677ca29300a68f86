"""The object `mlxqwen.load` returns: a model with its tokenizer and config."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from .config import ModelConfig
from .loader import load_model
from .tokenizer import Tokenizer


@dataclass
class LLM:
    model: nn.Module
    tokenizer: Tokenizer
    config: ModelConfig
    path: Path


def load(path: str | Path, dtype: mx.Dtype | None = None, lazy: bool = False) -> LLM:
    """Load a Hugging Face or MLX-quantized Qwen checkpoint directory.

    dtype: compute dtype of unquantized weights (default: bf16 on a GPU, fp32 on a CPU).
    lazy: leave weights memory-mapped until first use instead of reading them now.
    """
    path = Path(path).expanduser()
    model, config = load_model(path, dtype=dtype, lazy=lazy)
    return LLM(model=model, tokenizer=Tokenizer.from_dir(path), config=config, path=path)
