"""Bit budgets: bits and group size per tensor, chosen from measured sensitivity to fill a budget.

A budget is either bits per weight (`--target-bpw`, counted as mlx-lm's
`compute_bits_per_weight` counts a loaded model: every stored byte, packed weights, scales,
biases and the unquantized tensors, over the number of weights) or a memory size (`--fit`: the
weights as the runtime holds them plus what `mlxqwen.memory` estimates for the K/V cache,
recurrent state and working memory at `--context`). What `recipes.quantizable` refuses stays
unquantized whatever the budget.

Allocation is a multiple-choice knapsack solved greedily: every tensor starts at its cheapest
setting, and the budget goes, step by step, to the upgrade that removes the most KL per byte
along each tensor's lower convex hull of (bytes, KL). Sensitivities add up to first order, which
is what makes a per-tensor measurement enough."""

from __future__ import annotations

import heapq
import math
import re
from typing import Any

import mlx.core as mx
from rich.progress import Progress

from mlxqwen.display import format_size
from mlxqwen.errors import ConvertError, option
from mlxqwen.loader import cast_weights, default_dtype
from mlxqwen.memory import mlx_estimate

from .calibration import calibration_batch, user_text
from .reader import SourceCheckpoint
from .recipes import Quant, quantized_bytes, quants_for
from .sensitivity import measure

MIN_BPW = 2.0
_FIT_HEAD_BPW = 4.5  # an MTP head under --fit: 4-bit, group 64
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(k|m|g|t)i?b?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """`16GB` -> bytes. GB as memory is sold: 2**30 bytes (a 16 GB Mac has 16 GiB)."""
    match = _SIZE.match(text)
    if not match:
        raise ConvertError(f"{option('fit', text)}: expected a memory size like 16GB or 24GiB")
    return int(float(match.group(1)) * 1024 ** ("kmgt".index(match.group(2).lower()) + 1))


def allocate(
    shapes: dict[str, tuple[int, ...]],
    sensitivity: dict[str, dict[Quant, float]],
    budget: int,
    itemsize: int,
) -> dict[str, Quant]:
    """The setting of every tensor in `sensitivity` (KL it costs per setting) such that their bytes
    stay within `budget` and the summed KL is (greedily) least."""
    hulls = {name: _hull(shapes[name], costs, itemsize) for name, costs in sensitivity.items()}
    step = {name: 0 for name in hulls}
    spent = sum(hull[0][0] for hull in hulls.values())
    heap = [_upgrade(name, hull, 0) for name, hull in hulls.items() if len(hull) > 1]
    heapq.heapify(heap)
    while heap:
        _, name = heapq.heappop(heap)
        hull, i = hulls[name], step[name]
        extra = hull[i + 1][0] - hull[i][0]
        if spent + extra > budget:
            continue  # this tensor stays; cheaper upgrades of others may still fit
        spent += extra
        step[name] = i + 1
        if i + 2 < len(hull):
            heapq.heappush(heap, _upgrade(name, hull, i + 1))
    return {name: hulls[name][step[name]][2] for name in hulls}


def _hull(shape: tuple[int, ...], costs: dict[Quant, float], itemsize: int) -> list[tuple[int, float, Quant]]:
    """(bytes, KL, setting) on the lower convex hull, cheapest first: the settings worth paying for."""
    points = sorted((quantized_bytes(shape, q, itemsize), kl, q) for q, kl in costs.items())
    hull: list[tuple[int, float, Quant]] = []
    for point in points:
        if hull and point[1] >= hull[-1][1]:
            continue  # costs more and removes no KL
        if hull and point[0] == hull[-1][0]:
            hull.pop()
        while len(hull) >= 2 and _slope(hull[-2], hull[-1]) <= _slope(hull[-1], point):
            hull.pop()
        hull.append(point)
    return hull


def _slope(a: tuple[int, float, Quant], b: tuple[int, float, Quant]) -> float:
    return (a[1] - b[1]) / (b[0] - a[0])  # KL removed per byte


def _upgrade(name: str, hull: list[tuple[int, float, Quant]], i: int) -> tuple[float, str]:
    return -_slope(hull[i], hull[i + 1]), name


def check(options: dict[str, Any]) -> None:
    """One-line errors for a bad budget, before anything is read."""
    target, fit = options["target_bpw"], options["fit"]
    if target is not None and fit is not None:
        raise ConvertError(f"{option('target_bpw', target)}: give a bit budget or {option('fit')}, not both")
    for name in ("recipe", "group_size"):
        if (target is not None or fit is not None) and options[name] is not None:
            said = option(name, options[name])
            raise ConvertError(f"{said}: a budget chooses bits and group sizes per tensor; leave it out")
    if options["calibration"] is not None:
        if target is None and fit is None:
            said = option("calibration", options["calibration"])
            raise ConvertError(f"{said}: calibrates a budget; add {option('target_bpw')} or {option('fit')}")
        user_text(options["calibration"])
    if target is not None and target < MIN_BPW:
        raise ConvertError(f"{option('target_bpw', target)}: below {MIN_BPW:g} bits per weight is not supported")
    if fit is not None:
        parse_size(fit)
        if options["context"] <= 0:
            raise ConvertError(f"{option('context', options['context'])}: must be a positive number of tokens")


def plan(
    checkpoint: SourceCheckpoint,
    decoder: dict[str, mx.array],
    mtp: dict[str, mx.array],
    options: dict[str, Any],
    out_dtype: mx.Dtype,
    progress: Progress | None,
) -> tuple[dict[str, Quant], dict[str, dict[Quant, float]], dict[str, mx.array]]:
    """The setting of every quantized tensor under the budget `options` state, the sensitivities
    it was chosen from, and the importance of the matrices' input columns (`sensitivity.measure`).
    `decoder`, `mtp`: the lazy source tensors (nothing is read but the calibration pass's weights)."""
    cfg, target = checkpoint.cfg, options["target_bpw"]
    # --target-bpw counts the file's bytes; --fit the bytes the runtime holds (unquantized tensors cast)
    dtype = out_dtype if target is not None else default_dtype()
    weights = cast_weights(decoder, dtype)
    shapes = {name: tuple(value.shape) for name, value in {**decoder, **mtp}.items()}
    chosen = {name: quants_for(name, shapes[name]) for name in weights}
    chosen = {name: quants for name, quants in chosen.items() if quants}
    fixed = sum(value.nbytes for name, value in weights.items() if name not in chosen)
    head = {name: _uniform(name, shapes[name], target or _FIT_HEAD_BPW, dtype.size) for name in mtp}
    head = {name: q for name, q in head.items() if q}
    if target is not None:
        budget = int(target * sum(v.size for v in weights.values()) / 8) - fixed
        what = f"{option('target_bpw', target)}"
    else:
        memory = parse_size(options["fit"])
        fixed += sum(quantized_bytes(shapes[n], q, dtype.size) for n, q in head.items())
        fixed += sum(v.nbytes for n, v in cast_weights(mtp, dtype).items() if n not in head)
        rest = mlx_estimate(cfg, options["context"], weights=fixed, dtype=dtype, budget=memory)
        budget = memory - rest.total
        what = f"{option('fit', options['fit'])} at {option('context', options['context'])}"
    least = sum(min(quantized_bytes(shapes[n], q, dtype.size) for q in quants) for n, quants in chosen.items())
    if budget < least:
        if target is not None:
            params = sum(v.size for v in weights.values())
            need = f"{8 * (least + fixed) / params:.2f} bits per weight"
        else:
            need = f"{format_size(least + rest.total)} with its K/V cache and working memory"
        raise ConvertError(f"{what}: too small for this model, which needs at least {need} (every matrix at 2 bits)")
    batch = calibration_batch(checkpoint.path, cfg.vocab_size, options["calibration"])
    sensitivity, importance = measure(checkpoint, batch, chosen, seed=options["seed"], progress=progress)
    return {**allocate(shapes, sensitivity, budget, dtype.size), **head}, sensitivity, importance


def _uniform(name: str, shape: tuple[int, ...], target: float, itemsize: int) -> Quant | None:
    """The richest setting whose bits per weight stay within `target` (the cheapest if none does)."""
    quants = sorted(quants_for(name, shape), key=lambda q: quantized_bytes(shape, q, itemsize))
    within = [q for q in quants if 8 * quantized_bytes(shape, q, itemsize) <= target * math.prod(shape)]
    return within[-1] if within else (quants[0] if quants else None)
