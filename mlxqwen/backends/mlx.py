"""The MLX runtime: a Qwen model in MLX with its tokenizer and config.

Each sequence owns its per-layer caches. A batch decodes in one forward: the Gated DeltaNet
states of its sequences are stacked into one cache per layer while the batch stays the same
(stacked when it changes, written back to the sequences when it does), and attention reads
each sequence's own K/V (see `mlxqwen.cache`). One sequence alone runs on its own caches."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from .. import memory
from ..cache import KVBatch, KVCache, LinearAttentionCache, QuantizedKVCache
from ..config import ModelConfig
from ..errors import InsufficientMemoryError
from ..loader import default_dtype, load_model
from ..sampling import GenerationOptions, recommended_sampling
from ..tokenizer import Tokenizer, read_json
from .runtime import Runtime


class _Sequence:
    def __init__(self, caches: list[Any]):
        self.caches = caches
        self.length = 0


class MLXRuntime(Runtime):
    name = "MLX"

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Tokenizer,
        config: ModelConfig,
        path: Path,
        defaults: GenerationOptions,
        max_context: int,
        kv_capacity: int,
        dtype: mx.Dtype,
        kv_bits: int | None = None,
        kv_group_size: int = 64,
    ):
        if kv_bits is not None:
            if kv_bits not in (4, 8):
                raise ValueError(f"kv_bits={kv_bits}: K/V quantization takes 4 or 8 bits")
            if config.head_dim % kv_group_size:
                raise ValueError(
                    f"kv_bits: head_dim {config.head_dim} is not a multiple of the group size {kv_group_size}"
                )
        self.model, self.tokenizer, self.config, self.path = model, tokenizer, config, path
        self.defaults, self.max_context, self.kv_capacity = defaults, max_context, kv_capacity
        self.vocab_size = config.vocab_size
        self.kv_bits, self.kv_group_size = kv_bits, kv_group_size
        self.trimmable = not any(layer.is_linear for layer in model.layers)
        self.identity = {
            "runtime": self.name,
            "model": str(path.resolve()),
            "weights": sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in path.glob("*.safetensors")),
            "dtype": str(dtype),
            "kv_bits": kv_bits,
            "kv_group_size": kv_group_size,
        }
        self._batch: list[_Sequence] = []  # the sequences whose Gated DeltaNet state lives in _batch_caches
        self._batch_caches: list[Any] = []
        self._fed = 0  # tokens per sequence of the last verify

    def new_cache(self) -> list[Any]:
        """Per-layer caches for one sequence, for calling `model` directly."""
        cache = self.model.make_cache()
        if self.kv_bits is None:
            return cache
        return [QuantizedKVCache(self.kv_bits, self.kv_group_size) if type(c) is KVCache else c for c in cache]

    # --- the runtime interface ------------------------------------------------------

    def new_sequence(self) -> _Sequence:
        return _Sequence(self.new_cache())

    def release(self, seq: _Sequence) -> None:
        if seq in self._batch:
            self._unbatch()

    def prefill(self, seq: _Sequence, tokens: list[int]) -> None:
        if seq in self._batch:
            self._unbatch()
        # Only the cache is evaluated: the lm_head over the chunk is never computed.
        self.model(mx.array([tokens]), cache=seq.caches)
        mx.eval([c.state for c in seq.caches])
        mx.clear_cache()
        seq.length += len(tokens)

    def decode(self, seqs: Sequence[_Sequence], tokens: mx.array) -> mx.array:
        logits = self.model(tokens[:, None], cache=self._caches(seqs))[:, -1]
        for seq in seqs:
            seq.length += 1
        return logits

    def verify(self, seqs: Sequence[_Sequence], tokens: mx.array) -> mx.array:
        caches = self._caches(seqs)
        linear = [c for c in caches if isinstance(c, LinearAttentionCache)]
        for c in linear:
            c.keep_steps = True
        try:
            logits = self.model(tokens, cache=caches)
        finally:
            for c in linear:
                c.keep_steps = False
        self._fed = tokens.shape[1]
        for seq in seqs:
            seq.length += self._fed
        return logits

    def commit(self, seqs: Sequence[_Sequence], accepted: Sequence[int]) -> None:
        for c in self._caches(seqs):
            if isinstance(c, LinearAttentionCache):
                c.commit(self._fed, accepted)
            else:
                for kv, n in zip(c if isinstance(c, KVBatch) else [c], accepted, strict=True):
                    kv.commit(self._fed, n)
        for seq, n in zip(seqs, accepted, strict=True):
            seq.length -= self._fed - n

    def snapshot(self, seq: _Sequence) -> tuple[list[Any], int]:
        if seq in self._batch:
            self._unbatch()
        return [c.snapshot() for c in seq.caches], seq.length

    def restore(self, seq: _Sequence, snapshot: tuple[list[Any], int], length: int) -> None:
        states, _ = snapshot
        for c, state in zip(seq.caches, states, strict=True):
            c.restore(state)
            if isinstance(c, KVCache):
                c.offset = length
        seq.length = length

    def snapshot_bytes(self, snapshot: tuple[list[Any], int]) -> int:
        return sum(a.nbytes for state in snapshot[0] for a in _arrays(state))

    def save(self, snapshot: tuple[list[Any], int]) -> dict[str, mx.array]:
        states, length = snapshot
        arrays = {"length": mx.array(length)}
        for i, state in enumerate(states):
            for j, a in enumerate(_arrays(state)):
                arrays[f"{i}.{j}"] = a
        return arrays

    def load(self, arrays: dict[str, mx.array]) -> tuple[list[Any], int]:
        try:
            length = int(arrays["length"])
            reference = self.new_sequence()
            states = []
            for i, c in enumerate(reference.caches):
                parts = []
                while f"{i}.{len(parts)}" in arrays:
                    parts.append(arrays[f"{i}.{len(parts)}"])
                states.append(_state(c, parts, length, self.config))
        except (KeyError, ValueError, TypeError) as e:
            raise ValueError(f"a snapshot that does not fit this model ({e})") from None
        if len(arrays) != 1 + sum(len(_arrays(s)) for s in states):
            raise ValueError("a snapshot with arrays this model does not have")
        return states, length

    def settle(self) -> None:
        self._unbatch()

    def close(self) -> None:
        pass  # MLX frees arrays as soon as nothing references them

    # --- batches ----------------------------------------------------------------------

    def _caches(self, seqs: Sequence[_Sequence]) -> list[Any]:
        """The per-layer caches that run `seqs` together, in order."""
        if self._batch == list(seqs):
            return self._batch_caches
        self._unbatch()
        if len(seqs) == 1:
            return seqs[0].caches
        self._batch = list(seqs)
        self._batch_caches = [
            LinearAttentionCache.stack(group) if isinstance(group[0], LinearAttentionCache) else KVBatch(group)
            for group in zip(*(s.caches for s in seqs), strict=True)
        ]
        return self._batch_caches

    def _unbatch(self) -> None:
        """Give the batch's sequences their own Gated DeltaNet state back."""
        for i, c in enumerate(self._batch_caches):
            if isinstance(c, LinearAttentionCache):
                for row, seq in enumerate(self._batch):
                    seq.caches[i].restore(c.row(row))
        self._batch, self._batch_caches = [], []


def _arrays(state: tuple) -> list[mx.array]:
    """The arrays of one layer's snapshot (K/V: keys then values, each possibly quantized parts)."""
    out = []
    for part in state:
        if isinstance(part, mx.array):
            out.append(part)
        elif isinstance(part, tuple):
            out.extend(part)
    return out


def _state(cache: Any, parts: list[mx.array], length: int, cfg: ModelConfig) -> tuple:
    """One layer's snapshot from its saved arrays, checked against the layer."""
    if isinstance(cache, LinearAttentionCache):
        if len(parts) != 2 or parts[1].dtype != mx.float32 or parts[0].ndim != 3 or parts[1].ndim != 4:
            raise ValueError("Gated DeltaNet state")
        return tuple(parts)
    per_side = 3 if isinstance(cache, QuantizedKVCache) else 1
    if len(parts) != 2 * per_side:
        raise ValueError("K/V arrays")
    for p in parts:
        if p.ndim != 4 or p.shape[:3] != (1, cfg.num_key_value_heads, length):
            raise ValueError(f"K/V of shape {p.shape}")
    if per_side == 1:
        return parts[0], parts[1], length
    return tuple(parts[:3]), tuple(parts[3:]), length


def load(
    path: Path,
    *,
    dtype: mx.Dtype | None = None,
    lazy: bool = False,
    max_context: int | None = None,
    kv_bits: int | None = None,
    check_memory: bool = True,
) -> MLXRuntime:
    """A model directory on MLX; see `mlxqwen.load`."""
    model, config = load_model(path, dtype=dtype, lazy=True)
    tokenizer = Tokenizer.from_dir(path)
    dtype = dtype or default_dtype()
    sizing: dict[str, Any] = dict(weights=memory.weight_bytes(model), dtype=dtype, kv_bits=kv_bits)
    fits = memory.largest_context(config, **sizing)
    if max_context is None:
        if check_memory and fits < min(4096, config.max_position_embeddings):
            plan = memory.estimate(config, min(4096, config.max_position_embeddings), **sizing)
            raise InsufficientMemoryError(f"{path}: {plan.verdict}; use a smaller or more quantized model")
        max_context = fits or config.max_position_embeddings
    elif check_memory:
        plan = memory.estimate(config, max_context, **sizing)
        if not plan.fits:
            hint = f"max_context={fits} fits" if fits else "use a smaller or more quantized model"
            raise InsufficientMemoryError(f"{path}: at max_context={max_context} the model {plan.verdict}; {hint}")
    if not lazy:
        mx.eval(model.parameters())
    defaults = GenerationOptions(**recommended_sampling(read_json(path / "generation_config.json")))
    capacity = max(fits, max_context) if check_memory else 1 << 40
    return MLXRuntime(model, tokenizer, config, path, defaults, max_context, capacity, dtype, kv_bits)
