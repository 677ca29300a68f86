"""Projections of the same input in as few matmuls as their storage allows.

Checkpoints keep mlx-lm's separate projections (q/k/v, gate/up, Gated DeltaNet's four input
projections). At load time (`fuse`), each run of neighbours stored alike (unquantized in one
dtype, or quantized with the same bits, group size and mode) becomes its first layer, which then
computes the run's outputs concatenated; the others are removed. That is exact: every output row
keeps its own weights, and quantization groups run along the inputs. `project` computes the
projections either way.

The fused matmul pays where a step reads few tokens (decode, verify): one launch instead of
several. Over many tokens (prefill) its output would be one big array that lives as long as its
longest-lived part, and whose parts are strided views that elementwise ops cannot update in
place, so there each projection is computed apart, from views of the fused weights."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from itertools import accumulate

import mlx.core as mx
import mlx.nn as nn

_FUSED_ROWS = 64  # tokens up to which a step computes fused projections as one matmul


def _storage(linear: nn.Module) -> tuple:
    """What two layers must share to be computed as one."""
    quantization = tuple(getattr(linear, name, None) for name in ("group_size", "bits", "mode"))
    return type(linear), linear.weight.dtype, linear.weight.shape[-1], quantization, sorted(linear.keys())


def _concatenate(run: Sequence[nn.Module]) -> nn.Module:
    fused = copy.copy(run[0])  # the same kind of layer; its arrays are replaced
    for name, value in run[0].items():
        axis = -2 if value.ndim > 1 else -1  # weight, scales, biases [..., out, in]; bias [out]
        fused[name] = mx.concatenate([linear[name] for linear in run], axis=axis)
    return fused


def _rows(layer: nn.Module, start: int, end: int) -> nn.Module:
    """The layer computing outputs start..end of `layer`, from views of its arrays."""
    part = copy.copy(layer)
    for name, value in layer.items():
        part[name] = value[start:end] if value.ndim == 1 else value[start:end, :]
    return part


def fuse(module: nn.Module, names: Sequence[str]) -> None:
    """Fuse, in place, the projections `names` of `module` (Linear, QuantizedLinear or their
    per-expert kinds, all reading one input)."""
    runs = [[names[0]]]
    for name in names[1:]:
        if _storage(module[name]) == _storage(module[runs[-1][0]]):
            runs[-1].append(name)
        else:
            runs.append([name])
    for head, *rest in runs:
        if rest:
            module[head] = _concatenate([module[name] for name in (head, *rest)])
            for name in rest:
                del module[name]


def project(module: nn.Module, names: Sequence[str], sizes: Sequence[int], x: mx.array, *args) -> list[mx.array]:
    """The outputs of the projections `names` of `module` (of output sizes `sizes`), fused or not."""
    outputs = []
    heads = [i for i, name in enumerate(names) if name in module] + [len(names)]
    for start, end in zip(heads, heads[1:], strict=False):
        layer = module[names[start]]
        bounds = list(accumulate(sizes[start:end]))
        if end - start == 1:
            outputs.append(layer(x, *args))
        elif x.size // x.shape[-1] <= _FUSED_ROWS or layer.weight.ndim > 2:  # experts' views would be copies
            outputs.extend(mx.split(layer(x, *args), bounds[:-1], axis=-1))
        else:
            outputs.extend(_rows(layer, a, b)(x, *args) for a, b in zip([0, *bounds], bounds, strict=False))
    return outputs
