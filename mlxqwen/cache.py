"""Per-layer inference state: K/V for attention layers, conv + recurrent state for Gated DeltaNet.

A sequence owns one cache per layer. Several sequences decode together (continuous batching)
by stacking their Gated DeltaNet states into one `LinearAttentionCache` of B rows, while their
K/V stay their own (`KVBatch` is just the list): attention reads each sequence's own K/V at its
own length, so nothing is padded or copied when sequences join or leave a batch.

Speculative decoding feeds several tokens, then keeps the first n of them (`commit`). K/V
caches roll back by moving their offset: positions past it are overwritten later. Gated DeltaNet
cannot roll back, so while `keep_steps` is set it keeps the state after every position of the
pass and `commit` picks the one each row needs: nothing is recomputed.

`snapshot()` returns the state of this moment as arrays of its own, `restore()` takes it back.
A snapshot costs no copy when it is taken: MLX copies a buffer only when it is written while
something else still references it, which for K/V happens once, at the next write.
"""

from __future__ import annotations

from collections.abc import Sequence
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

    def commit(self, fed: int, accepted: int) -> None:
        """Keep `accepted` of the `fed` positions just written."""
        self.offset -= fed - accepted

    def snapshot(self) -> tuple[Any, Any, int]:
        # Copies of the rows in use: `update_and_fetch` writes into the arrays in place, and a
        # slice would keep the whole buffer (grown `step` rows at a time) alive while it is kept.
        return _head(self.keys, self.offset), _head(self.values, self.offset), self.offset

    def restore(self, snapshot: tuple[Any, Any, int]) -> None:
        self.keys, self.values, self.offset = snapshot

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.state)

    @property
    def state(self) -> list[mx.array]:
        return [] if self.keys is None else [self.keys, self.values]


def _head(stored: mx.array | tuple[mx.array, ...] | None, n: int) -> Any:
    if stored is None or isinstance(stored, mx.array):
        return None if stored is None else mx.contiguous(stored[..., :n, :])
    return tuple(mx.contiguous(part[..., :n, :]) for part in stored)


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
    def state(self) -> list[mx.array]:
        return [] if self.keys is None else [*self.keys, *self.values]


class KVBatch(list):
    """The K/V caches of the sequences in a batch, one per row, each at its own length."""

    @property
    def offsets(self) -> mx.array:
        return mx.array([c.offset for c in self])


class LinearAttentionCache:
    """Gated DeltaNet state of B sequences: the last kernel-1 conv inputs [B, K-1, C] and the
    recurrent matrices [B, H, Dk, Dv] (fp32).

    keep_steps: the next pass keeps what `commit` needs to stop after any of its positions."""

    def __init__(self) -> None:
        self.conv_state: mx.array | None = None
        self.recurrent_state: mx.array | None = None
        self.keep_steps = False
        self._steps: tuple[mx.array, mx.array] | None = None  # conv inputs [B, K-1+T, C], states [T, B, ...]

    def update(self, conv_inputs: mx.array, states: mx.array, width: int) -> None:
        """Called by the layer after a pass: conv_inputs are the past `width` conv inputs followed by
        the T new ones; states the recurrent state after each position (with keep_steps) or the last."""
        self.conv_state = conv_inputs[:, -width:]
        self.recurrent_state = states[-1]
        self._steps = (conv_inputs, states) if self.keep_steps else None

    def commit(self, fed: int, accepted: Sequence[int]) -> None:
        """Keep, per row, the state after `accepted[row]` of the `fed` positions of the last pass."""
        if all(n == fed for n in accepted):
            self._steps = None
            return
        conv_inputs, states = self._steps
        n = mx.array(accepted)
        rows = mx.arange(len(accepted))
        width = self.conv_state.shape[1]
        window = n[:, None] + mx.arange(width)[None, :]
        self.conv_state = mx.take_along_axis(conv_inputs, window[..., None], axis=1)
        self.recurrent_state = states[n - 1, rows]
        self._steps = None

    def snapshot(self) -> tuple[Any, Any]:
        return self.conv_state, self.recurrent_state

    def restore(self, snapshot: tuple[Any, Any]) -> None:
        self.conv_state, self.recurrent_state = snapshot

    @classmethod
    def stack(cls, caches: Sequence[LinearAttentionCache]) -> LinearAttentionCache:
        """One cache holding the rows of `caches`, in order (their states are copied; a sequence
        that has seen no token yet starts from zeros, as the layer would)."""
        batch = cls()
        full = next((c for c in caches if c.conv_state is not None), None)
        if full is not None:
            zeros = [mx.zeros_like(a) for a in full.snapshot()]
            rows = [zeros if c.conv_state is None else c.snapshot() for c in caches]
            batch.conv_state, batch.recurrent_state = (mx.concatenate(parts) for parts in zip(*rows, strict=True))
        return batch

    def row(self, i: int) -> tuple[mx.array, mx.array]:
        """Row i's state as arrays of its own (not views that would keep the whole batch alive)."""
        if self.conv_state is None:
            return None, None
        index = mx.array([i])
        return mx.take(self.conv_state, index, axis=0), mx.take(self.recurrent_state, index, axis=0)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.state)

    @property
    def state(self) -> list[mx.array]:
        return [a for a in (self.conv_state, self.recurrent_state) if a is not None]
