"""A multi-turn chat that never reprocesses its history.

The model's cache lives as long as the chat. Each turn feeds only the tokens that the
chat template appends for the new message(s): the end of the previous reply, the new
user (or tool) message and the generation prompt. The tokens already in the cache stay
exactly as they were generated, thinking included.

Why not "render the whole conversation and reuse the common prefix": Qwen3.5/3.6 and
Qwen3 templates drop the `<think>` part of earlier assistant turns when they render the
history again, so the re-rendered text stops matching the cache right after the previous
question and everything after it would be recomputed every turn; and Gated DeltaNet
state cannot be cut back to a prefix at all. Instead the new turn's text is found by
rendering the history with the last reply replaced by a marker and taking what follows
the marker. That text is what a re-render would append; only the way earlier replies
appear differs (we keep their thinking in the cache, a re-render would not), a
difference the model handles: it is the conversation exactly as it happened.

Regenerate and edit-last go back to snapshots taken at the last turn's boundaries
(before its message, before its reply): a K/V cache snapshot is its length, a linear
attention snapshot references its state arrays. Only the last turn's snapshots are
kept, which bounds their memory (Qwen3.6-27B's recurrent state is about 150 MB)."""

from __future__ import annotations

import copy
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .engine import (
    Backend,
    GenerationOptions,
    Message,
    TokenCache,
    generate_events,
    last,
    thinking_vars,
)
from .events import Done, Event, TextDelta, ThinkingDelta, ToolCall, assistant_message
from .parsing import opens_thinking

_MARKER = "\u2063MLXQWEN-TURN-END\u2063"


@dataclass
class _Turn:
    """The last turn: where it started, where its reply starts, and how to generate it again."""

    before_message: tuple[Any, int]
    history_index: int  # where the turn's messages start in the history
    reply_index: int  # where its reply goes in the history
    last_token: int  # the prompt's last token, fed when the reply starts
    thinking: bool  # the prompt opened <think>
    before_reply: tuple[Any, int] | None = None


class ChatSession:
    """A conversation with a model that keeps the model's cache between turns.

    `send` / `stream` add a message and generate the reply; `regenerate` draws the last
    reply again; `edit_last` replaces the last message; `cancel` stops a running reply
    from any thread. The partial reply of a stopped generation stays in the history; a
    message whose prompt was still being processed is dropped with the turn."""

    def __init__(
        self,
        backend: Backend,
        *,
        system: str | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        think: bool | None = None,
        history: Sequence[Message] = (),
        template_vars: Mapping[str, Any] | None = None,
        options: GenerationOptions | None = None,
    ):
        if backend.tokenizer.chat_template is None:
            raise ValueError("this model has no chat template, so it cannot chat; use generate(..., raw=True)")
        self.backend = backend
        self.tools = list(tools) if tools else None
        self.think = think
        self.template_vars = dict(template_vars or {})
        self.options = options or backend.defaults
        self._history: list[dict[str, Any]] = [{"role": "system", "content": system}] if system is not None else []
        self._history += [dict(m) for m in history]
        self._context = TokenCache(backend)
        self._turn: _Turn | None = None
        self._cancel = threading.Event()

    @property
    def history(self) -> list[dict[str, Any]]:
        """The conversation so far (a copy), in chat-template form: assistant messages carry
        `reasoning_content` and `tool_calls`."""
        return copy.deepcopy(self._history)

    @property
    def tokens(self) -> int:
        """Tokens in the model's cache."""
        return len(self._context)

    def cancel(self) -> None:
        """Stop the reply being generated (safe from any thread)."""
        self._cancel.set()

    def reset(self) -> None:
        """Forget everything but the system message."""
        self._history = [m for m in self._history[:1] if m["role"] == "system"]
        self._context = TokenCache(self.backend)
        self._turn = None

    def send(self, message: str | Message | Sequence[Message], **kwargs: Any) -> Done:
        """Add a user message (a string), or other messages (e.g. tool results:
        {"role": "tool", "content": ...}), and return the reply. kwargs as in `stream`."""
        return last(self.stream(message, **kwargs))

    def stream(
        self, message: str | Message | Sequence[Message], *, think: bool | None = None, **overrides: Any
    ) -> Iterator[Event]:
        """Like `send`, as events (see `Backend.stream`). think: thinking for this turn
        (None: the chat's setting); overrides: `GenerationOptions` fields for this turn."""
        if isinstance(message, str):
            messages = [{"role": "user", "content": message}]
        elif isinstance(message, Mapping):
            messages = [dict(message)]
        else:
            messages = [dict(m) for m in message]
        return self._turn_events(messages, self.think if think is None else think, overrides)

    def regenerate(self, **overrides: Any) -> Done:
        """Draw the last reply again from the same prompt, without recomputing anything."""
        return last(self.stream_regenerate(**overrides))

    def stream_regenerate(self, **overrides: Any) -> Iterator[Event]:
        turn = self._require_turn()

        def events() -> Iterator[Event]:
            self._context.restore(turn.before_reply)
            del self._history[turn.reply_index :]
            yield from self._reply_events(turn, [turn.last_token], overrides)

        return events()

    def edit_last(self, message: str | Message | Sequence[Message], **kwargs: Any) -> Done:
        """Replace the last message sent (and its reply) with `message`, and reply to it."""
        return last(self.stream_edit_last(message, **kwargs))

    def stream_edit_last(self, message: str | Message | Sequence[Message], **kwargs: Any) -> Iterator[Event]:
        turn = self._require_turn()

        def events() -> Iterator[Event]:
            self._context.restore(turn.before_message)
            del self._history[turn.history_index :]
            self._turn = None
            yield from self.stream(message, **kwargs)

        return events()

    def _require_turn(self) -> _Turn:
        if self._turn is None:
            raise RuntimeError("no reply to go back to: send a message first")
        return self._turn

    def _new_tokens(self, messages: list[dict[str, Any]], think: bool | None) -> tuple[list[int], bool]:
        """The tokens the template appends for `messages` after what the cache holds."""
        template, tokenizer = self.backend.tokenizer.chat_template, self.backend.tokenizer
        render_vars = {**thinking_vars(think), **self.template_vars}
        if len(self._context):
            marked = self._history[:-1] + [{"role": "assistant", "content": _MARKER}] + messages
            text = template.render(marked, tools=self.tools, **render_vars)
            if _MARKER in text:
                text = text[text.rindex(_MARKER) + len(_MARKER) :]
                ids = tokenizer.encode(text)
                if ids and ids[0] == self._context.tokens[-1] and ids[0] in tokenizer.eos_token_ids:
                    ids = ids[1:]  # the reply's own end token is in the cache already
                return ids, opens_thinking(text)
            self._context, self._turn = TokenCache(self.backend), None  # the template hides the last reply
        text = template.render(self._history + messages, tools=self.tools, **render_vars)
        return tokenizer.encode(text), opens_thinking(text)

    def _turn_events(
        self, messages: list[dict[str, Any]], think: bool | None, overrides: Mapping[str, Any]
    ) -> Iterator[Event]:
        ids, thinking = self._new_tokens(messages, think)
        turn = _Turn(
            before_message=self._context.snapshot(),
            history_index=len(self._history),
            reply_index=len(self._history) + len(messages),
            last_token=ids[-1],
            thinking=thinking,
        )
        self._history.extend(messages)
        yield from self._reply_events(turn, ids, overrides)

    def _reply_events(self, turn: _Turn, ids: list[int], overrides: Mapping[str, Any]) -> Iterator[Event]:
        def prefilled() -> None:
            turn.before_reply = self._context.snapshot()

        self._cancel.clear()
        options = self.backend.options(self.options, **overrides)
        done, parts = None, []
        try:
            for event in generate_events(
                self._context,
                ids,
                options,
                thinking=turn.thinking,
                tools=self.tools,
                cancel=self._cancel,
                after_prefill=prefilled,
            ):
                if isinstance(event, Done):
                    done = event
                elif isinstance(event, (TextDelta, ThinkingDelta, ToolCall)):
                    parts.append(event)
                yield event
        finally:
            if turn.before_reply is None:  # stopped while reading the prompt: the turn never happened
                self._context.restore(turn.before_message)
                del self._history[turn.history_index :]
            else:
                self._turn = turn
                self._history.append(done.to_message() if done else _partial_message(parts))


def _partial_message(parts: list[TextDelta | ThinkingDelta | ToolCall]) -> dict[str, Any]:
    """The assistant message of a reply whose reader stopped before its end."""
    return assistant_message(
        "".join(p.text for p in parts if isinstance(p, TextDelta)),
        "".join(p.text for p in parts if isinstance(p, ThinkingDelta)),
        [p for p in parts if isinstance(p, ToolCall)],
    )
