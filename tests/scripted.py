"""A backend that "generates" scripted replies: the engine and chat logic, tested without a model."""

from __future__ import annotations

import mlx.core as mx

from mlxqwen.engine import Backend, GenerationOptions
from mlxqwen.tokenizer import Tokenizer


class ScriptedBackend(Backend):
    """Each forward returns logits that make the next token of `script` (then EOS) the only
    choice; every token fed is recorded in the cache and counted in `fed`."""

    def __init__(self, tokenizer: Tokenizer, max_context: int = 100_000):
        self.tokenizer = tokenizer
        self.defaults = GenerationOptions(temperature=0)
        self.max_context = max_context
        self.eos = min(tokenizer.eos_token_ids)
        self.fed = 0
        self.say("")

    def say(self, text: str) -> None:
        """The next reply(ies): text, then EOS."""
        self.script = self.tokenizer.encode(text) + [self.eos]
        self.position = 0

    def new_cache(self) -> list[int]:
        return []

    def prefill(self, cache: list[int], tokens: list[int]) -> None:
        cache.extend(tokens)
        self.fed += len(tokens)

    def forward(self, cache: list[int], tokens: mx.array) -> mx.array:
        self.prefill(cache, tokens.tolist())
        token = self.script[self.position] if self.position < len(self.script) else self.eos
        self.position += 1
        return mx.zeros(self.tokenizer.vocab_size).at[token].add(100.0)

    def snapshot(self, cache: list[int]) -> int:
        return len(cache)

    def restore(self, cache: list[int], snapshot: int) -> None:
        del cache[snapshot:]

    def settle(self, cache) -> None:
        pass
