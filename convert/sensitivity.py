"""How much KL divergence quantizing each tensor costs: the measurement bit budgets allocate by.

For a small change δ of the weights, KL(source || changed) on a text is, to second order,
½ δᵀ F δ, with F the Fisher information of the model's next-token distributions. F is the
expectation, over next tokens y drawn from the model itself, of g gᵀ, where g is the gradient of
log p(y) with respect to the weights; so ½ (gᵀ δ)² for a drawn y is an unbiased estimate of
the KL, and averaging it over sequences and draws tightens it. For each tensor and each
setting (bits, group size) we take δ = dequantize(quantize(W)) − W: one backward pass per
draw and sequence prices every setting of every tensor at once.

It streams like the quality report: a forward pass one layer at a time keeps each layer's
input (the calibration activations: layers × tokens × hidden size, fp32), then the backward
pass walks the layers from the last to the first, each read once more from disk and freed
after use. Draws come from `mx.random` with a key made from `seed`, so the result is the same
for the same seed."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from rich.progress import Progress

from .progress import add_task
from .quality import source_model
from .reader import SourceCheckpoint
from .recipes import Quant

DRAWS = 16  # draws of the next tokens, at least: spread over the calibration sequences


def measure(
    checkpoint: SourceCheckpoint,
    batch: mx.array,
    quants: dict[str, list[Quant]],
    *,
    seed: int = 0,
    progress: Progress | None = None,
) -> tuple[dict[str, dict[Quant, float]], dict[str, mx.array]]:
    """KL (nats per token) that each setting of each tensor in `quants` (decoder names) costs on
    the calibration sequences `batch` [B, T]; and the importance of each matrix's input columns,
    the mean square of its input (per expert and column for stacked experts) on the same text."""
    sequences, length = batch.shape
    hidden, importance = _layer_inputs(checkpoint, batch, quants, progress)
    model = source_model(checkpoint, mx.float32)
    lm = getattr(model, "language_model", model)
    prefix = "" if lm is model else "language_model."
    layers = lm.model.layers
    task = add_task(progress, "sensitivity: backward", len(layers) + 1) if progress is not None else None
    samples = -(-DRAWS // sequences)
    draws = [b for _ in range(samples) for b in range(sequences)]
    keys = mx.random.split(mx.random.key(seed), len(draws))
    # <g, δ> per tensor, setting and draw, summed over every place the tensor is used
    parts = {name: [mx.zeros(len(qs))] * len(draws) for name, qs in quants.items()}

    def align(name: str, weight: mx.array, grad: mx.array, d: int) -> mx.array:
        parts[name][d] = parts[name][d] + mx.stack([(grad * _error(weight, q)).sum() for q in quants[name]])
        return parts[name][d]

    def backward(module: nn.Module, module_prefix: str, fn, h: mx.array, d: int, cotangent: mx.array) -> mx.array:
        params = dict(tree_flatten(module.parameters()))
        names = [n for n in params if module_prefix + n in quants]
        dx, grads = _vjp(module, names, fn, h, cotangent)
        mx.eval(dx, [align(module_prefix + n, params[n], g, d) for n, g in zip(names, grads, strict=True)])
        return dx

    tied = lm.config.tie_word_embeddings
    head, head_prefix = (lm.model.embed_tokens, "model.embed_tokens.") if tied else (lm.lm_head, "lm_head.")
    cotangents = []
    for d, b in enumerate(draws):
        h = hidden[-1][b : b + 1]
        logits = _logits(lm, h)
        drawn = mx.random.categorical(logits, key=keys[d])
        # the gradient of log p(drawn) with respect to the logits
        dz = (mx.arange(logits.shape[-1]) == drawn[..., None]).astype(mx.float32) - mx.softmax(logits, axis=-1)
        cotangents.append(backward(head, prefix + head_prefix, lambda x: _logits(lm, x), h, d, dz))

    for i in reversed(range(len(layers))):
        if task is not None:
            progress.advance(task)
        hidden.pop()
        layer = layers[i]
        for d, b in enumerate(draws):
            cotangents[d] = backward(
                layer, f"{prefix}model.layers.{i}.", layer, hidden[-1][b : b + 1], d, cotangents[d]
            )
        layers[i] = None  # frees the layer's weights

    # the embedding's input side: each token's row gets the first layer's input gradient
    embed = f"{prefix}model.embed_tokens.weight"
    if embed in quants:
        weight = lm.model.embed_tokens.weight
        mx.eval([align(embed, weight[batch[b]], cotangents[d][0], d) for d, b in enumerate(draws)])
    if task is not None:
        progress.advance(task)
    tokens = samples * sequences * length
    kl = {name: (0.5 * mx.stack(alignments) ** 2).sum(axis=0) / tokens for name, alignments in parts.items()}
    return {name: dict(zip(quants[name], kl[name].tolist(), strict=True)) for name in quants}, importance


def _error(weight: mx.array, quant: Quant) -> mx.array:
    """δ: what quantizing `weight` with `quant` (bits, group size) changes."""
    bits, group_size = quant
    return mx.dequantize(*mx.quantize(weight, group_size, bits), group_size=group_size, bits=bits) - weight


def _logits(lm: nn.Module, h: mx.array) -> mx.array:
    h = lm.model.norm(h)
    return lm.model.embed_tokens.as_linear(h) if lm.config.tie_word_embeddings else lm.lm_head(h)


def _vjp(module: nn.Module, names: list[str], fn, x: mx.array, cotangent: mx.array) -> tuple[mx.array, list[mx.array]]:
    """The gradients of <cotangent, fn(x)> with respect to x and to the parameters `names` of
    `module` (which `fn` uses)."""
    params = dict(tree_flatten(module.parameters()))
    originals = [params[n] for n in names]

    def run(x, *weights):
        module.update(tree_unflatten(list(zip(names, weights, strict=True))))
        return fn(x)

    _, grads = mx.vjp(run, [x, *originals], [cotangent])
    module.update(tree_unflatten(list(zip(names, originals, strict=True))))
    return grads[0], list(grads[1:])


class _Recorder(nn.Module):
    """Wraps a linear layer (or a layer of stacked experts) and sums the squares of its inputs per
    input column (per expert and column)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module
        experts = module.weight.shape[:-2]
        self.squares = mx.zeros((*experts, module.weight.shape[-1]))
        self.count = mx.zeros((*experts, 1))

    def __call__(self, x: mx.array, *args, **kwargs) -> mx.array:
        squares = x.astype(mx.float32) ** 2
        if args:  # stacked experts: `x` [..., 1, D] goes to the experts `args[0]` names
            indices = args[0]
            squares = squares.squeeze(-2) if squares.ndim == indices.ndim + 2 else squares
            squares = mx.broadcast_to(squares, (*indices.shape, squares.shape[-1])).reshape(-1, squares.shape[-1])
            self.squares = self.squares.at[indices.flatten()].add(squares)
            self.count = self.count.at[indices.flatten()].add(1)
        else:
            self.squares = self.squares + squares.reshape(-1, squares.shape[-1]).sum(axis=0)
            self.count = self.count + squares.size // squares.shape[-1]
        return self.module(x, *args, **kwargs)


def _wrap(layer: nn.Module, names: list[str]) -> dict[str, _Recorder]:
    """Put a recorder around each of `layer`'s submodules whose weight is named in `names`."""
    recorders = {}
    for name in names:
        path = name.removesuffix(".weight").split(".")
        parent = layer
        for part in path[:-1]:
            parent = parent[int(part)] if isinstance(parent, list) else getattr(parent, part)
        recorders[name] = _Recorder(getattr(parent, path[-1]))
        setattr(parent, path[-1], recorders[name])
    return recorders


def _layer_inputs(
    checkpoint: SourceCheckpoint, batch: mx.array, quants: dict[str, list[Quant]], progress: Progress | None
) -> tuple[list[mx.array], dict[str, mx.array]]:
    """The input of every layer, and the last layer's output, on `batch`: a forward pass that reads
    one layer at a time and then drops it. Also the mean square of each quantized matrix's input
    per column (per expert and column for stacked experts): its importance."""
    model = source_model(checkpoint, mx.float32)
    lm = getattr(model, "language_model", model)
    prefix = "" if lm is model else "language_model."
    layers = lm.model.layers
    task = add_task(progress, "sensitivity: forward", len(layers)) if progress is not None else None
    hidden, importance = [lm.model.embed_tokens(batch)], {}
    for i in range(len(layers)):
        layer_prefix = f"{prefix}model.layers.{i}."
        names = [n for n, _ in tree_flatten(layers[i].parameters()) if layer_prefix + n in quants]
        recorders = _wrap(layers[i], names)
        hidden.append(layers[i](hidden[-1]))
        for name, recorder in recorders.items():
            importance[layer_prefix + name] = recorder.squares / mx.maximum(recorder.count, 1)
        mx.eval(hidden[-1], importance)
        layers[i] = None
        if task is not None:
            progress.advance(task)
    if f"{prefix}lm_head.weight" in quants:  # the output layer reads the final norm's output
        h = lm.model.norm(hidden[-1]).astype(mx.float32)
        importance[f"{prefix}lm_head.weight"] = (h**2).reshape(-1, h.shape[-1]).mean(axis=0)
    return hidden, importance


def importance(
    checkpoint: SourceCheckpoint, batch: mx.array, names: list[str], progress: Progress | None = None
) -> dict[str, mx.array]:
    """The importance of the input columns of the matrices `names` (see `measure`) on `batch`:
    a forward pass only, what llama.cpp's importance matrix holds."""
    hidden, found = _layer_inputs(checkpoint, batch, dict.fromkeys(names), progress)
    del hidden
    return found
