"""Choosing the next token: penalties, temperature, top-k, top-p, min-p, seeded draws.

Everything runs as MLX operations, so a draw stays inside the lazy decode graph and the
engine can compute token t+1 while token t is being handed to the caller."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, NamedTuple

import mlx.core as mx


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is drawn. temperature 0 is greedy (argmax).

    top_k: keep the k most likely tokens (0: all). top_p: keep the smallest set whose
    probability reaches p. min_p: drop tokens less likely than min_p times the top one.
    repetition_penalty: divides positive (multiplies negative) logits of every token
    already in the context, prompt included (1: off). presence_penalty / frequency_penalty:
    subtracted from the logits of generated tokens, once / per occurrence (0: off).
    seed: the same seed gives the same tokens (None: a fresh random seed)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None

    def __post_init__(self) -> None:
        checks = [
            ("temperature", self.temperature >= 0),
            ("top_p", 0 < self.top_p <= 1),
            ("top_k", self.top_k >= 0),
            ("min_p", 0 <= self.min_p <= 1),
            ("repetition_penalty", self.repetition_penalty > 0),
        ]
        for name, ok in checks:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r} is out of range")


@dataclass(frozen=True)
class GenerationOptions(SamplingParams):
    """Sampling (see `SamplingParams`) plus when to stop and what to report.

    max_tokens: most tokens to generate (None: until EOS or the context is full).
    stop: strings that end generation; the text stops before them.
    logprobs: None, or report each token's log-probability with this many top alternatives.
    format: None, "json" (a JSON object) or a JSON schema (a dict) the answer must follow
    (see `mlxqwen.structured`)."""

    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None
    format: str | Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "stop", (self.stop,) if isinstance(self.stop, str) else tuple(self.stop))
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens!r} must be at least 1")
        if self.logprobs is not None and self.logprobs < 0:
            raise ValueError(f"logprobs={self.logprobs!r} must be 0 or more")
        if not (self.format is None or self.format == "json" or isinstance(self.format, Mapping)):
            raise ValueError(f"format={self.format!r}: use None, 'json' or a JSON schema (a dict)")


def recommended_sampling(generation_config: Mapping[str, Any]) -> dict[str, Any]:
    """The sampling fields a checkpoint's `generation_config.json` recommends (Qwen ships
    temperature, top_p and top_k there); `do_sample: false` means greedy."""
    values = {
        f.name: generation_config[f.name]
        for f in fields(SamplingParams)
        if f.name != "seed" and generation_config.get(f.name) is not None
    }
    if generation_config.get("do_sample") is False:
        values["temperature"] = 0.0
    return values


_BLOCK = 128


def top_k_ids(logits: mx.array, k: int) -> mx.array:
    """Ids of the k largest logits, in no order. They all lie in the k blocks of 128 ids with
    the largest maxima, so only those blocks are partitioned: on a CPU that takes a tenth of
    the 1.7 ms that partitioning a 150k-token vocabulary does (most of a draw's time)."""
    vocab = logits.shape[-1]
    blocks = -(-vocab // _BLOCK)
    if blocks <= k:
        return mx.argpartition(-logits, k - 1)[:k]
    if vocab % _BLOCK:
        logits = mx.pad(logits, (0, blocks * _BLOCK - vocab), constant_values=-mx.inf)
    rows = logits.reshape(blocks, _BLOCK)
    best = mx.argpartition(-rows.max(axis=1), k - 1)[:k]
    ids = (best[:, None] * _BLOCK + mx.arange(_BLOCK)).reshape(-1)
    return ids[mx.argpartition(-rows[best].reshape(-1), k - 1)[:k]]


class Sample(NamedTuple):
    """One draw: the token id and, when asked for, its log-probability and the top alternatives."""

    token: mx.array
    logprob: mx.array | None = None
    top_ids: mx.array | None = None
    top_logprobs: mx.array | None = None


class Sampler:
    """Draws tokens from next-token logits [vocab] under `params`.

    context: token ids already in the sequence (for the repetition penalty).
    logprobs: None, or how many top alternatives to report with each draw's log-probability."""

    def __init__(self, params: SamplingParams, context: Sequence[int] = (), logprobs: int | None = None):
        self.params = params
        self.context = list(context)
        self.logprobs = logprobs
        seed = params.seed if params.seed is not None else random.getrandbits(63)
        self.key = mx.random.key(seed)
        self.seen: mx.array | None = None  # occurrences in context + output
        self.counts: mx.array | None = None  # occurrences in output

    @property
    def penalized(self) -> bool:
        """Whether a draw depends on the tokens drawn before it (repetition, presence or frequency penalty)."""
        p = self.params
        return p.repetition_penalty != 1.0 or bool(p.presence_penalty or p.frequency_penalty)

    @property
    def greedy(self) -> bool:
        """Whether a draw is the argmax of the logits as they come (temperature 0, no penalty)."""
        return self.params.temperature == 0 and not self.penalized

    def _penalize(self, logits: mx.array) -> mx.array:
        p = self.params
        vocab = logits.shape[-1]
        if p.repetition_penalty != 1.0:
            if self.seen is None:
                self.seen = mx.zeros(vocab, mx.int32)
                if self.context:
                    self.seen = self.seen.at[mx.array(self.context, mx.int32)].add(1)
            penalized = mx.where(logits > 0, logits / p.repetition_penalty, logits * p.repetition_penalty)
            logits = mx.where(self.seen > 0, penalized, logits)
        if p.presence_penalty or p.frequency_penalty:
            if self.counts is None:
                self.counts = mx.zeros(vocab, mx.int32)
            logits = logits - p.presence_penalty * (self.counts > 0) - p.frequency_penalty * self.counts
        return logits

    def _candidates(self, logits: mx.array) -> tuple[mx.array | None, mx.array]:
        """The ids a draw may pick (None: every id) and their logits after top-k, temperature,
        top-p and min-p (-inf where filtered out). Sampling only (temperature > 0)."""
        p = self.params
        ids = None
        if 0 < p.top_k < logits.shape[-1]:
            ids = top_k_ids(logits, p.top_k)
            logits = logits[ids]
        logits = logits / p.temperature  # after top-k (which it leaves the same): k values, not the vocabulary
        if p.top_p < 1 or p.min_p > 0:
            order = mx.argsort(-logits)
            ids = order if ids is None else ids[order]
            logits = logits[order]
            probs = mx.softmax(logits)
            keep = mx.ones(probs.shape, mx.bool_)
            if p.top_p < 1:
                keep = keep & ((mx.cumsum(probs) - probs) < p.top_p)
            if p.min_p > 0:
                keep = keep & (probs >= p.min_p * probs[0])
            logits = mx.where(keep, logits, -mx.inf)
        return ids, logits

    def _draw(self, logits: mx.array) -> mx.array:
        if self.params.temperature == 0:
            return mx.argmax(logits, axis=-1)
        ids, logits = self._candidates(logits)
        choice = mx.random.categorical(logits, key=self._key())
        return choice if ids is None else ids[choice]

    def _key(self) -> mx.array:
        self.key, key = mx.random.split(self.key)
        return key

    def _processed(self, logits: mx.array, allowed: mx.array | None) -> mx.array:
        logits = self._penalize(logits.reshape(-1).astype(mx.float32))
        return logits if allowed is None else mx.where(allowed, logits, -mx.inf)

    def distribution(self, logits: mx.array, allowed: mx.array | None = None) -> mx.array:
        """The probabilities [vocab] a draw from `logits` follows now (penalties, filters and
        temperature applied; all on the argmax when greedy). Changes nothing."""
        logits = self._processed(logits, allowed)
        if self.params.temperature == 0:
            return (mx.arange(logits.shape[-1]) == mx.argmax(logits)).astype(mx.float32)
        ids, candidates = self._candidates(logits)
        probs = mx.softmax(candidates)
        return probs if ids is None else mx.zeros(logits.shape[-1]).at[ids].add(probs)

    def draw_from(self, probs: mx.array) -> mx.array:
        """A token drawn from the probabilities `probs` (the largest when greedy)."""
        if self.params.temperature == 0:
            return mx.argmax(probs)
        return mx.random.categorical(mx.log(probs), key=self._key())

    def uniform(self) -> mx.array:
        return mx.random.uniform(key=self._key())

    def record(self, token: mx.array | int) -> None:
        """Count `token` as generated (for the penalties)."""
        if self.seen is not None:
            self.seen = self.seen.at[token].add(1)
        if self.counts is not None:
            self.counts = self.counts.at[token].add(1)

    def __call__(self, logits: mx.array, allowed: mx.array | None = None) -> Sample:
        """Draw from `logits`; `allowed` (bool over the vocabulary) keeps the draw among those ids."""
        token = self._draw(self._processed(logits, allowed))
        self.record(token)
        return self.report(logits, token)

    def report(self, logits: mx.array, token: mx.array) -> Sample:
        """`token` with its log-probability under `logits` and the top alternatives, as asked."""
        logits = logits.reshape(-1).astype(mx.float32)
        if self.logprobs is None:
            return Sample(token)
        logprobs = logits - mx.logsumexp(logits)
        if not self.logprobs:
            return Sample(token, logprobs[token])
        top = mx.argpartition(-logprobs, self.logprobs - 1)[: self.logprobs]
        top = top[mx.argsort(-logprobs[top])]
        return Sample(token, logprobs[token], top, logprobs[top])
