"""The MLX backend: an MLX model with its tokenizer and config. The model and its cache stay
usable directly: `llm.model(tokens, cache=llm.new_cache())`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from .. import memory
from ..cache import KVCache, QuantizedKVCache
from ..checkpoint import has_weights
from ..config import ModelConfig, Yarn, parse_yarn
from ..engine import Backend, GenerationOptions
from ..loader import default_dtype, load_model, model_from_config
from ..sampling import recommended_sampling
from ..tokenizer import Tokenizer, read_json


@dataclass
class LLM(Backend):
    name = "MLX"

    model: nn.Module
    tokenizer: Tokenizer
    config: ModelConfig
    path: Path
    defaults: GenerationOptions = field(default_factory=GenerationOptions)
    max_context: int = 0  # 0: the model's max_position_embeddings
    kv_bits: int | None = None  # store K/V in 8 or 4 bits
    kv_group_size: int = field(init=False, default=64)  # for kv_bits: the one the memory estimate counts

    def __post_init__(self) -> None:
        self.max_context = self.max_context or self.config.max_position_embeddings
        if self.kv_bits is not None:
            if self.kv_bits not in (4, 8):
                raise ValueError(f"kv_bits={self.kv_bits}: K/V quantization takes 4 or 8 bits")
            self.kv_group_size = memory.kv_group_size(self.config.head_dim)

    def new_cache(self) -> list[Any]:
        cache = self.model.make_cache()
        if self.kv_bits is None:
            return cache
        return [QuantizedKVCache(self.kv_bits, self.kv_group_size) if type(c) is KVCache else c for c in cache]

    def prefill(self, cache: list[Any], tokens: list[int]) -> None:
        # Only the cache is evaluated: the lm_head over the chunk is never computed.
        self.model(mx.array([tokens]), cache=cache)
        mx.eval([c.state for c in cache])
        mx.clear_cache()

    def settle(self, cache: list[Any]) -> None:
        # Lazy cache arrays belong to this thread's stream; evaluate them before another thread reads them.
        mx.eval([c.state for c in cache])

    def forward(self, cache: list[Any], tokens: mx.array) -> mx.array:
        return self.model(tokens[None], cache=cache)[0, -1]

    def snapshot(self, cache: list[Any]) -> list[Any]:
        return [c.snapshot() for c in cache]

    def restore(self, cache: list[Any], snapshot: list[Any]) -> None:
        for c, s in zip(cache, snapshot, strict=True):
            c.restore(s)


def load(
    path: Path,
    *,
    dtype: mx.Dtype | None = None,
    lazy: bool = False,
    max_context: int | None = None,
    kv_bits: int | None = None,
    check_memory: bool = True,
    rope_scaling: dict[str, Any] | None = None,
) -> LLM:
    """A model directory on MLX; see `mlxqwen.load`."""
    model, config = load_model(path, dtype=dtype, lazy=True, yarn=parse_yarn(rope_scaling))
    tokenizer = Tokenizer.from_dir(path)
    plan = model_sizing(model, config, dtype=dtype, kv_bits=kv_bits)
    max_context = memory.choose_context(plan, requested=max_context, check_memory=check_memory, where=str(path))
    if not lazy:
        mx.eval(model.parameters())
    defaults = GenerationOptions(**recommended_sampling(read_json(path / "generation_config.json")))
    return LLM(model, tokenizer, config, path, defaults, max_context, kv_bits)


def model_sizing(
    model: nn.Module, config: ModelConfig, *, dtype: mx.Dtype | None = None, kv_bits: int | None = None
) -> memory.Sizing:
    """The memory policy's view of a model (built lazily, weights not read) as `load` runs it."""
    weights, dtype = memory.weight_bytes(model), dtype or default_dtype()
    return memory.mlx_sizing(config, weights=weights, dtype=dtype, kv_bits=kv_bits, prefill_chunk=LLM.prefill_chunk)


def sizing(
    path: Path, *, dtype: mx.Dtype | None = None, kv_bits: int | None = None, yarn: Yarn | None = None
) -> memory.Sizing:
    """The memory policy's view of the model in `path` as `load` runs it, reading no weight: from
    the checkpoint's tensor headers, or from config.json alone when the weights are not there yet."""
    if has_weights(path):
        model, config = load_model(path, dtype=dtype, lazy=True, yarn=yarn)
    else:
        model, config = model_from_config(path, dtype=dtype, yarn=yarn)
    return model_sizing(model, config, dtype=dtype, kv_bits=kv_bits)
