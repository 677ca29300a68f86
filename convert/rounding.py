"""Activation-aware rounding: each group's scale and bias chosen for the inputs the model sees.

Round-to-nearest (`mx.quantize`) spans each group's minimum to maximum and minimizes nothing in
particular. Here each group's scale s and bias b minimize the error the layer's output sees,
sum_j a_j (w_j - (s q_j + b))^2, where a_j is the mean square of input column j on the
calibration text (its importance, as llama.cpp's importance matrix weighs its K-quants): from a
few clipped ranges, alternate rounding q and solving the weighted least squares for (s, b), and
keep per group whichever setting (round-to-nearest's included) has the least weighted error.
The result is plain affine quantization, packed as `mx.quantize` packs it, so any loader of
mlx-lm's format reads it."""

from __future__ import annotations

import mlx.core as mx

_CLIPS = (1.0, 0.95, 0.9, 0.85, 0.8)  # share of the group's range the grid spans at first
_REFITS = 4


def quantize(weight: mx.array, importance: mx.array, group_size: int, bits: int) -> tuple[mx.array, ...]:
    """(packed weight, scales, biases) of `weight` [..., out, in] in mx.quantize's layout and dtype.
    importance: mean square of the input per column, [in] (or [experts, in] for stacked experts)."""
    top = 2**bits - 1
    w = weight.astype(mx.float32)
    groups = (*w.shape[:-1], w.shape[-1] // group_size, group_size)
    w = w.reshape(groups)
    a = importance.astype(mx.float32)
    a = a.reshape(*a.shape[:-1], 1, groups[-2], group_size) if a.ndim > 1 else a.reshape(groups[-2:])
    a = a + 1e-8 * a.mean() + 1e-30  # columns the text never used keep a little weight

    _, scales, biases = mx.quantize(weight, group_size, bits)
    best = (scales.astype(mx.float32), biases.astype(mx.float32))
    best_error = _error(w, a, *best, top)
    low, high = w.min(axis=-1), w.max(axis=-1)
    for clip in _CLIPS:
        span = (high - low) * clip
        s, b = mx.maximum(span / top, 1e-12), low + (high - low - span) / 2
        for _ in range(_REFITS):
            s, b = _refit(w, a, s, b, top)
        s, b = (x.astype(weight.dtype).astype(mx.float32) for x in (s, b))  # as they will be stored
        error = _error(w, a, s, b, top)
        better = error < best_error
        best = (mx.where(better, s, best[0]), mx.where(better, b, best[1]))
        best_error = mx.minimum(error, best_error)
    scales, biases = best[0].astype(weight.dtype), best[1].astype(weight.dtype)
    q = _levels(w, scales.astype(mx.float32), biases.astype(mx.float32), top)
    return _pack(q.reshape(weight.shape), bits), scales, biases


def _levels(w: mx.array, s: mx.array, b: mx.array, top: int) -> mx.array:
    return mx.clip(mx.round((w - b[..., None]) / s[..., None]), 0, top)


def _error(w: mx.array, a: mx.array, s: mx.array, b: mx.array, top: int) -> mx.array:
    q = _levels(w, s, b, top)
    return (a * (w - (s[..., None] * q + b[..., None])) ** 2).sum(axis=-1)


def _refit(w: mx.array, a: mx.array, s: mx.array, b: mx.array, top: int) -> tuple[mx.array, mx.array]:
    """Round with (s, b), then the (s, b) of least weighted error for those levels (2x2 normal
    equations per group); groups where that is degenerate keep theirs."""
    q = _levels(w, s, b, top)
    sa, sq, sqq = a.sum(axis=-1), (a * q).sum(axis=-1), (a * q * q).sum(axis=-1)
    sw, sqw = (a * w).sum(axis=-1), (a * q * w).sum(axis=-1)
    det = sa * sqq - sq * sq
    ok = det > 1e-12 * sa * sqq
    det = mx.where(ok, det, 1)
    new_s, new_b = (sa * sqw - sq * sw) / det, (sqq * sw - sq * sqw) / det
    ok = ok & (new_s > 0)
    return mx.where(ok, new_s, s), mx.where(ok, new_b, b)


def _pack(q: mx.array, bits: int) -> mx.array:
    """Levels [..., n] as mx.quantize packs them: a little-endian bit stream in uint32 words."""
    q = q.astype(mx.uint32)
    stream = (q[..., None] >> mx.arange(bits, dtype=mx.uint32)) & 1
    words = stream.reshape(*q.shape[:-1], q.shape[-1] * bits // 32, 32)
    return (words << mx.arange(32, dtype=mx.uint32)).sum(axis=-1).astype(mx.uint32)
