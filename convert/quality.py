"""The quality report: what a conversion did to the model, measured on the built-in calibration
text with mlxqwen's own model on both sides.

- KL divergence KL(source || converted) of the next-token distributions, mean over positions (nats);
- top-1 agreement: how often both pick the same most likely next token;
- perplexity of the text under each model.

Both models run one layer at a time, each layer freed once used, so a source larger than
memory (a 27B bf16 checkpoint on a 32 GB Mac) can be measured."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from rich.progress import Progress

from mlxqwen.loader import cast_weights, default_dtype, load_model
from mlxqwen.models import build_model
from mlxqwen.tokenizer import Tokenizer

from .calibration import TEXT, check_tokens
from .progress import add_task
from .reader import SourceCheckpoint


@dataclass
class Quality:
    tokens: int
    kl: float
    top1: float
    ppl_source: float
    ppl_converted: float

    def summary(self) -> str:
        return (
            f"KL {self.kl:.4f} nats/token, top-1 agreement {self.top1:.1%}, "
            f"perplexity {self.ppl_source:.3f} -> {self.ppl_converted:.3f} ({self.tokens} tokens)"
        )


def calibration_tokens(directory: Path, vocab_size: int) -> list[int]:
    """The report's held-out text in the tokens of the checkpoint at `directory`."""
    return check_tokens(Tokenizer.from_dir(directory).encode(TEXT), directory, vocab_size)


def evaluate(source: SourceCheckpoint, converted: Path, tokens: list[int], progress: Progress | None = None) -> Quality:
    dtype = default_dtype()
    reference = layerwise_logits(source_model(source, dtype), tokens, progress, "eval: source")
    model, _ = load_model(converted, dtype=dtype, lazy=True)
    logits = layerwise_logits(model, tokens, progress, "eval: converted")
    return compare(reference, logits, tokens)


def source_model(source: SourceCheckpoint, dtype: mx.Dtype) -> nn.Module:
    """The source model with lazy weights (FP8 dequantized), nothing read yet."""
    decoder, _, _ = source.tensors()
    model = build_model(source.cfg)
    model.load_weights(list(cast_weights(decoder, dtype).items()))
    return model.eval()


def layerwise_logits(model: nn.Module, tokens: list[int], progress: Progress | None, label: str) -> mx.array:
    """Logits [T, V] of one forward pass that evaluates one layer at a time and then drops it.
    The model is unusable afterwards."""
    lm = getattr(model, "language_model", model)
    layers = lm.model.layers
    task = add_task(progress, label, len(layers) + 1) if progress is not None else None
    h = lm.model.embed_tokens(mx.array([tokens]))
    for i in range(len(layers)):
        h = layers[i](h)
        mx.eval(h)
        layers[i] = None  # frees the layer's weights (read lazily from disk)
        if task is not None:
            progress.advance(task)
    h = lm.model.norm(h)
    logits = lm.model.embed_tokens.as_linear(h) if lm.config.tie_word_embeddings else lm.lm_head(h)
    logits = logits[0].astype(mx.float32)
    mx.eval(logits)
    if task is not None:
        progress.advance(task)
    return logits


def compare(reference: mx.array, logits: mx.array, tokens: list[int]) -> Quality:
    logp_ref = reference - mx.logsumexp(reference, axis=-1, keepdims=True)
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    kl = (mx.exp(logp_ref) * (logp_ref - logp)).sum(axis=-1).mean()
    top1 = (reference.argmax(axis=-1) == logits.argmax(axis=-1)).mean()
    targets = mx.array(tokens[1:])[:, None]

    def perplexity(logp: mx.array) -> float:
        return math.exp(-mx.take_along_axis(logp[:-1], targets, axis=-1).mean().item())

    return Quality(len(tokens), kl.item(), top1.item(), perplexity(logp_ref), perplexity(logp))
