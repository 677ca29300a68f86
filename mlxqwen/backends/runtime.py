"""The seam between the engine and a model runtime (MLX, llama.cpp, the tests' scripted one).

A runtime computes; it never sees text. It holds per-sequence state behind opaque handles and
offers what the engine's scheduler needs:
- `prefill` one sequence's prompt tokens (no logits),
- `decode` one token for each of many sequences in one forward (continuous batching),
- `verify` a few tokens per sequence (logits at every position), then `commit` the first n of
  them per sequence: what speculative decoding needs, with no recomputation on rejection,
- `draft` the tokens that may follow, with the model's own multi-token-prediction (MTP) head,
- `snapshot` / `restore` a sequence's whole state (the prefix cache keeps snapshots), and
  `save` / `load` a snapshot as arrays for the prefix cache's disk tier.

Calls come from one thread, the engine's, one at a time. Logits may be lazy MLX arrays."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import mlx.core as mx

from ..sampling import GenerationOptions
from ..tokenizer import Tokenizer


class Runtime(ABC):
    """name: shown to users ("MLX", "llama.cpp"). vocab_size: the logits' width. max_context: the longest sequence.
    kv_capacity: tokens of K/V all live sequences may hold together. trimmable: a snapshot also
    serves any shorter prefix of its tokens (no recurrent state). identity: what the model's
    computations depend on (weights, dtypes), for the prefix cache's disk tier."""

    name: str
    tokenizer: Tokenizer
    vocab_size: int
    defaults: GenerationOptions
    max_context: int
    kv_capacity: int
    prefill_chunk: int = 512
    trimmable: bool
    identity: dict[str, Any]
    mtp: bool = False  # `draft` works: the model's MTP head is loaded

    @abstractmethod
    def new_sequence(self) -> Any:
        """An empty sequence."""

    @abstractmethod
    def release(self, seq: Any) -> None:
        """Free what `seq` holds; it is not used again."""

    @abstractmethod
    def prefill(self, seq: Any, tokens: list[int]) -> None:
        """Feed tokens into `seq` (at most `prefill_chunk`); no logits are computed."""

    @abstractmethod
    def decode(self, seqs: Sequence[Any], tokens: mx.array) -> mx.array:
        """Feed one token to each sequence (`tokens` [B], possibly not yet evaluated) and return the
        next-token logits [B, vocab]."""

    @abstractmethod
    def verify(self, seqs: Sequence[Any], tokens: mx.array) -> mx.array:
        """Feed T tokens to each sequence (`tokens` [B, T]) and return the logits after each [B, T, vocab].
        `commit` must follow before any other call."""

    @abstractmethod
    def commit(self, seqs: Sequence[Any], accepted: Sequence[int]) -> None:
        """Keep the first accepted[i] (1..T) tokens of the last `verify` in sequence i."""

    def draft(
        self, seqs: Sequence[Any], tokens: mx.array, depth: int, pick: Callable[[mx.array], mx.array]
    ) -> mx.array:
        """Guess `depth` tokens to follow each sequence's next token `tokens` [B] (about to be fed, not
        fed yet) with the MTP head, chained: `pick(logits [B, vocab])` chooses each guess [B] from the
        head's logits. Returns the guesses [B, depth]. The sequences' model state is unchanged (the
        head keeps its own state per sequence, up to date with what `verify`/`commit` kept)."""
        raise NotImplementedError(f"{self.name} has no MTP head loaded")

    def catch_up(self, seqs: Sequence[Any]) -> None:  # noqa: B027 (nothing to read without a head)
        """Let the MTP head read now what `seqs` were fed since it last read (steps that drafted
        nothing), so that the next `draft` reads only the newest token."""

    @abstractmethod
    def snapshot(self, seq: Any) -> Any:
        """The state of `seq` now, independent of what `seq` does next."""

    @abstractmethod
    def restore(self, seq: Any, snapshot: Any, length: int) -> None:
        """Put `seq` (empty) in the state of `snapshot` cut back to its first `length` tokens
        (`length` < the snapshot's only when `trimmable`)."""

    @abstractmethod
    def snapshot_bytes(self, snapshot: Any) -> int: ...

    @abstractmethod
    def save(self, snapshot: Any) -> dict[str, mx.array]:
        """A snapshot as named arrays, for a file."""

    @abstractmethod
    def load(self, arrays: dict[str, mx.array]) -> Any:
        """A snapshot from `save`'s arrays; ValueError when they do not fit this model."""

    @abstractmethod
    def settle(self) -> None:
        """Bring every sequence's state back to it (the engine calls this when no sequence runs)."""

    @abstractmethod
    def close(self) -> None:
        """Free the model now rather than when the runtime is collected."""

    def peak_memory(self) -> int:
        """The most memory the runtime has held, in bytes."""
        return mx.get_peak_memory()
