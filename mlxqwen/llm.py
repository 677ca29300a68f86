"""`mlxqwen.load`, and `LLM`, the MLX backend: an MLX model with its tokenizer and config,
which generates through the engine (`generate`, `stream`, `chat`, see
`mlxqwen.generate.Backend`). The model and its cache stay usable directly:
`llm.model(tokens, cache=llm.new_cache())`. GGUF models load into llama.cpp instead
(`mlxqwen.llama_cpp_backend`); `mlxqwen.backends` says which runs what."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from . import memory
from .backends import choose
from .cache import KVCache, QuantizedKVCache
from .config import ModelConfig
from .errors import ModelLoadError
from .generate import Backend, GenerationOptions
from .loader import default_dtype, load_model
from .sampling import recommended_sampling
from .tokenizer import Tokenizer, read_json

logger = logging.getLogger("mlxqwen")


class InsufficientMemoryError(ModelLoadError):
    """The model, at the context asked for, would not fit in this machine's memory."""


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
    path: str | Path,
    dtype: mx.Dtype | None = None,
    lazy: bool = False,
    *,
    backend: str = "auto",
    max_context: int | None = None,
    kv_bits: int | None = None,
    check_memory: bool = True,
) -> Backend:
    """Load a model: a Hugging Face or MLX-quantized Qwen checkpoint directory, or a GGUF file.

    backend: "mlx", "llama.cpp", or "auto": MLX on Apple Silicon, elsewhere llama.cpp for a
        model with GGUF weights (see `mlxqwen.backends`); `llm.name` says which runs.
    dtype: compute dtype of unquantized weights (default: bf16 on a GPU, fp32 on a CPU); on
        llama.cpp, the K/V cache's type (default float16).
    lazy: leave weights memory-mapped until first use instead of reading them now (llama.cpp
        always maps them).
    max_context: longest conversation in tokens (default: the longest that fits in memory,
        at most the model's own; on llama.cpp, which allocates it up front, at most 32,768).
    kv_bits: keep the K/V cache in 8 or 4 bits (less memory for long contexts).
    check_memory: refuse, before reading any weight, a model and context that would not fit
        in this machine's memory (see `mlxqwen.memory`).
    """
    choice = choose(Path(path).expanduser(), backend)
    if choice.note:
        logger.warning(choice.note)
    if choice.backend == "llama.cpp":
        from . import llama_cpp_backend

        return llama_cpp_backend.load(
            choice.path, dtype=dtype, max_context=max_context, kv_bits=kv_bits, check_memory=check_memory
        )
    path = choice.path
    model, config = load_model(path, dtype=dtype, lazy=True)
    tokenizer = Tokenizer.from_dir(path)
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
    defaults = GenerationOptions(**recommended_sampling(read_json(path / "generation_config.json")))
    return LLM(model, tokenizer, config, path, defaults, max_context, kv_bits)
