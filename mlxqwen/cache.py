"""Per-layer inference state: K/V for attention layers, conv + recurrent state for Gated DeltaNet.

Both kinds support `snapshot()` / `restore()` so a chat can return to a turn
boundary without recomputing. A K/V snapshot is just the offset: positions
before it are never rewritten, so restoring means "forget what came after".
A linear-attention state cannot be trimmed, so its snapshot keeps references
to the (immutable) state arrays of that moment, which costs no copy.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx


class KVCache:
    """Keys and values stored once per KV head, grown in blocks of `step` positions."""

    step = 256

    def __init__(self) -> None:
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        prev, n = self.offset, keys.shape[2]
        if self.keys is None or prev + n > self.keys.shape[2]:
            B, H, _, Dk = keys.shape
            grow = ((n + self.step - 1) // self.step) * self.step
            new_k = mx.zeros((B, H, grow, Dk), keys.dtype)
            new_v = mx.zeros((B, H, grow, values.shape[3]), values.dtype)
            if self.keys is None:
                self.keys, self.values = new_k, new_v
            else:
                self.keys = mx.concatenate([self.keys[..., :prev, :], new_k], axis=2)
                self.values = mx.concatenate([self.values[..., :prev, :], new_v], axis=2)
        self.offset += n
        self.keys[..., prev : self.offset, :] = keys
        self.values[..., prev : self.offset, :] = values
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    def snapshot(self) -> int:
        return self.offset

    def restore(self, snapshot: int) -> None:
        self.offset = snapshot

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes

    @property
    def state(self) -> list[mx.array]:
        return [] if self.keys is None else [self.keys, self.values]


class LinearAttentionCache:
    """Gated DeltaNet state: the last kernel-1 conv inputs and the recurrent matrix per head."""

    def __init__(self) -> None:
        self.conv_state: mx.array | None = None
        self.recurrent_state: mx.array | None = None
        self.offset = 0

    def snapshot(self) -> tuple[Any, Any, int]:
        return (self.conv_state, self.recurrent_state, self.offset)

    def restore(self, snapshot: tuple[Any, Any, int]) -> None:
        self.conv_state, self.recurrent_state, self.offset = snapshot

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.state)

    @property
    def state(self) -> list[mx.array]:
        return [a for a in (self.conv_state, self.recurrent_state) if a is not None]


class QuantizedKVCache(KVCache):
    """A KVCache that stores keys and values as `bits`-bit affine groups (`mx.quantize`):
    8-bit takes about half the memory of bf16, 4-bit about a quarter. Attention still
    receives full-precision arrays: they are dequantized on fetch, one layer at a time,
    so only the quantized form stays in memory."""

    def __init__(self, bits: int = 8, group_size: int = 64) -> None:
        super().__init__()
        self.bits, self.group_size = bits, group_size
        self.keys: tuple[mx.array, ...] | None = None
        self.values: tuple[mx.array, ...] | None = None

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        prev, n = self.offset, keys.shape[2]
        new = [mx.quantize(x, group_size=self.group_size, bits=self.bits) for x in (keys, values)]
        if self.keys is None or prev + n > self.keys[0].shape[2]:
            size = ((n + self.step - 1) // self.step) * self.step
            grown = []
            for old, parts in zip((self.keys, self.values), new, strict=True):
                blank = [mx.zeros((*p.shape[:2], size, p.shape[3]), p.dtype) for p in parts]
                if old is not None:
                    blank = [mx.concatenate([o[..., :prev, :], b], axis=2) for o, b in zip(old, blank, strict=True)]
                grown.append(tuple(blank))
            self.keys, self.values = grown
        self.offset += n
        for stored, parts in zip((self.keys, self.values), new, strict=True):
            for dst, src in zip(stored, parts, strict=True):
                dst[..., prev : self.offset, :] = src
        k, v = (
            mx.dequantize(*(p[..., : self.offset, :] for p in stored), group_size=self.group_size, bits=self.bits)
            for stored in (self.keys, self.values)
        )
        return k, v

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.state)

    @property
    def state(self) -> list[mx.array]:
        return [] if self.keys is None else [*self.keys, *self.values]
