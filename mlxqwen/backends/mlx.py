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
from ..checkpoint import read_json
from ..config import ModelConfig
from ..engine import Backend, GenerationOptions
from ..errors import InsufficientMemoryError
from ..loader import default_dtype, load_model
from ..sampling import recommended_sampling
from ..tokenizer import Tokenizer


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
    kv_group_size: int = 64

    def __post_init__(self) -> None:
        self.max_context = self.max_context or self.config.max_position_embeddings
        if self.kv_bits is not None:
            if self.kv_bits not in (4, 8):
                raise ValueError(f"kv_bits={self.kv_bits}: K/V quantization takes 4 or 8 bits")
            if self.config.head_dim % self.kv_group_size:
                raise ValueError(
                    f"kv_bits: head_dim {self.config.head_dim} is not a multiple of the group size {self.kv_group_size}"
                )

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
) -> LLM:
    """A model directory on MLX; see `mlxqwen.load`."""
    model, config = load_model(path, dtype=dtype, lazy=True)
    generation_config = read_json(path / "generation_config.json")
    tokenizer = Tokenizer.from_dir(path, generation_config)
    sizing: dict[str, Any] = dict(weights=memory.weight_bytes(model), dtype=dtype or default_dtype(), kv_bits=kv_bits)
    if max_context is None:
        max_context = memory.largest_context(config, **sizing)
        if check_memory and max_context < min(4096, config.max_position_embeddings):
            plan = memory.estimate(config, min(4096, config.max_position_embeddings), **sizing)
            raise InsufficientMemoryError(f"{path}: {plan.verdict}; use a smaller or more quantized model")
        max_context = max_context or config.max_position_embeddings
    elif check_memory:
        plan = memory.estimate(config, max_context, **sizing)
        if not plan.fits:
            fits = memory.largest_context(config, **sizing)
            hint = f"max_context={fits} fits" if fits else "use a smaller or more quantized model"
            raise InsufficientMemoryError(f"{path}: at max_context={max_context} the model {plan.verdict}; {hint}")
    if not lazy:
        mx.eval(model.parameters())
    defaults = GenerationOptions(**recommended_sampling(generation_config))
    return LLM(model, tokenizer, config, path, defaults, max_context, kv_bits)
