"""Everything a generation reports, one type each: reasoning and answer pieces, parsed tool
calls, prompt progress, and the closing `Done` with the whole reply and its stats."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ThinkingDelta:
    """A piece of the model's reasoning."""

    text: str


@dataclass(frozen=True)
class TextDelta:
    """A piece of the answer."""

    text: str


@dataclass(frozen=True)
class ToolCall:
    """A parsed tool call; `arguments` maps parameter names to JSON values."""

    name: str
    arguments: dict[str, Any] = field(default_factory=dict)

    def to_message(self) -> dict[str, Any]:
        """The call as an entry of an assistant message's `tool_calls` (OpenAI / chat template form)."""
        return {"type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class PrefillProgress:
    """Prompt tokens processed so far (sent between prefill chunks of a long prompt)."""

    done: int
    total: int


@dataclass(frozen=True)
class Stats:
    """prompt_tokens: fed to the model by this call; cached_tokens: reused from the cache.
    ttft: seconds to the first token; peak_memory: bytes (the runtime's `peak_memory`).
    finish_reason: "stop" (EOS or stop string), "tool_calls", "length" or "cancelled".
    draft_tokens: tokens the MTP head guessed (speculative decoding); accepted_tokens: of them, kept."""

    prompt_tokens: int
    cached_tokens: int
    prompt_tps: float
    generated_tokens: int
    generation_tps: float
    ttft: float
    peak_memory: int
    finish_reason: str
    draft_tokens: int = 0
    accepted_tokens: int = 0


@dataclass(frozen=True)
class TokenLogprob:
    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def assistant_message(text: str, thinking: str, tool_calls: Sequence[ToolCall]) -> dict[str, Any]:
    """A reply in chat-template form: `reasoning_content` and `tool_calls` when present."""
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if thinking:
        message["reasoning_content"] = thinking
    if tool_calls:
        message["tool_calls"] = [call.to_message() for call in tool_calls]
    return message


def reply_message(parts: Sequence[ThinkingDelta | TextDelta | ToolCall]) -> dict[str, Any]:
    """The assistant message of a reply's pieces so far (one stopped, or still being written)."""
    return assistant_message(
        "".join(p.text for p in parts if isinstance(p, TextDelta)),
        "".join(p.text for p in parts if isinstance(p, ThinkingDelta)),
        [p for p in parts if isinstance(p, ToolCall)],
    )


@dataclass(frozen=True)
class Done:
    """The last event of a generation: the whole reply and its stats."""

    text: str
    thinking: str
    tool_calls: tuple[ToolCall, ...]
    stats: Stats
    logprobs: tuple[TokenLogprob, ...] | None = None

    @property
    def finish_reason(self) -> str:
        return self.stats.finish_reason

    def to_message(self) -> dict[str, Any]:
        """The reply as an assistant message for a chat history."""
        return assistant_message(self.text, self.thinking, self.tool_calls)

    def __str__(self) -> str:
        return self.text


Event = ThinkingDelta | TextDelta | ToolCall | PrefillProgress | Done
