"""A multi-turn chat that never reprocesses its history.

Each turn sends the engine the conversation's tokens as they are in the model's state (every
reply exactly as generated, thinking included) followed by the tokens the chat template
appends for the new message(s): the end of the previous reply, the new user (or tool) message
and the generation prompt. The engine resumes from the state the previous turn left in the
prefix cache, so only those new tokens are read.

Why not "render the whole conversation": Qwen3.5/3.6 and Qwen3 templates drop the `<think>`
part of earlier assistant turns when they render the history again, so the re-rendered text
differs from what the model read and generated. Instead the new turn's text is found by
rendering the history with the last reply replaced by a marker and taking what follows the
marker: what a re-render would append. Only the way earlier replies appear differs (the model
keeps their thinking), a difference it handles: it is the conversation exactly as it happened.

The chat pins the prefix-cache entries it may go back to: the state after the last reply, the
state before the last turn's message (`edit_last`) and before its reply (`regenerate`), so
neither recomputes anything. Older entries are unpinned, which bounds their memory (Qwen3.6-27B's
recurrent state is about 150 MB); so are all of them when the chat is dropped."""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .engine import Handle, Request
from .events import Done, Event
from .llm import Message, events, last
from .parsing import opens_thinking
from .prefix_cache import Entry, PrefixCache
from .sampling import GenerationOptions

if TYPE_CHECKING:
    from .llm import LLM

_MARKER = "\u2063MLXQWEN-TURN-END\u2063"


@dataclass
class _Turn:
    """The last turn: what it started from, its messages and prompt, and where they are in the history."""

    before: list[int]  # the conversation's tokens before the turn's messages
    before_entry: Entry | None
    messages: list[dict[str, Any]]
    think: bool | str | None
    prompt: list[int]  # the tokens the reply follows
    thinking: bool  # the prompt opened <think>
    history_index: int  # where the turn's messages start in the history
    prompt_entry: Entry | None = None

    @property
    def reply_index(self) -> int:
        return self.history_index + len(self.messages)


class ChatSession:
    """A conversation with a model that keeps the model's state between turns.

    `send` / `stream` add a message and generate the reply; `regenerate` draws the last
    reply again; `edit_last` replaces the last message; `cancel` stops a running reply
    from any thread. The partial reply of a stopped generation stays in the history; a
    message whose prompt was still being read is dropped with the turn."""

    def __init__(
        self,
        llm: LLM,
        *,
        system: str | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        think: bool | str | None = None,
        history: Sequence[Message] = (),
        template_vars: Mapping[str, Any] | None = None,
        options: GenerationOptions | None = None,
    ):
        if llm.tokenizer.chat_template is None:
            raise ValueError("this model has no chat template, so it cannot chat; use generate(..., raw=True)")
        self.llm = llm
        self.tools = list(tools) if tools else None
        self.think = think
        self.template_vars = dict(template_vars or {})
        self.options = options or llm.defaults
        self._history: list[dict[str, Any]] = [{"role": "system", "content": system}] if system is not None else []
        self._history += [dict(m) for m in history]
        self._tokens: list[int] = []  # the conversation in the model's state, after the last reply
        self._state: Entry | None = None  # the prefix-cache entry holding that state
        self._turn: _Turn | None = None
        self._cancel = threading.Event()
        self._pins: list[Entry] = []  # one pin per entry this chat holds
        weakref.finalize(self, _unpin, llm.prefix_cache, self._pins)

    @property
    def history(self) -> list[dict[str, Any]]:
        """The conversation so far (a copy), in chat-template form: assistant messages carry
        `reasoning_content` and `tool_calls`."""
        return [dict(m) for m in self._history]

    @property
    def conversation(self) -> list[dict[str, Any]]:
        """`history` without the system message: the turns."""
        return [m for m in self.history if m["role"] != "system"]

    @property
    def tokens(self) -> int:
        """Tokens in the model's state for this chat."""
        return len(self._tokens)

    def cancel(self) -> None:
        """Stop the reply being generated (safe from any thread)."""
        self._cancel.set()

    def reset(self) -> None:
        """Forget everything but the system message."""
        self._history = [m for m in self._history[:1] if m["role"] == "system"]
        self._tokens, self._state, self._turn = [], None, None
        self._keep_pins([])

    def send(self, message: str | Message | Sequence[Message], **kwargs: Any) -> Done:
        """Add a user message (a string), or other messages (e.g. tool results:
        {"role": "tool", "content": ...}), and return the reply. kwargs as in `stream`."""
        return last(self.stream(message, **kwargs))

    def stream(
        self, message: str | Message | Sequence[Message], *, think: bool | str | None = None, **overrides: Any
    ) -> Iterator[Event]:
        """Like `send`, as events (see `LLM.stream`). think: thinking for this turn
        (None: the chat's setting); overrides: `GenerationOptions` fields for this turn."""
        if isinstance(message, str):
            messages = [{"role": "user", "content": message}]
        elif isinstance(message, Mapping):
            messages = [dict(message)]
        else:
            messages = [dict(m) for m in message]
        return self._turn_events(messages, self.think if think is None else think, overrides)

    def regenerate(self, **kwargs: Any) -> Done:
        """Draw the last reply again from the same prompt, without recomputing anything.
        think= changes the thinking setting for it (then the last message is read again)."""
        return last(self.stream_regenerate(**kwargs))

    def stream_regenerate(self, *, think: bool | str | None = None, **overrides: Any) -> Iterator[Event]:
        turn = self._require_turn()
        if think is not None and think != turn.think:
            return self._redo(turn, turn.messages, think, overrides)

        def regenerated() -> Iterator[Event]:
            del self._history[turn.reply_index :]
            yield from self._reply(turn, overrides)

        return regenerated()

    def edit_last(self, message: str | Message | Sequence[Message], **kwargs: Any) -> Done:
        """Replace the last message sent (and its reply) with `message`, and reply to it."""
        return last(self.stream_edit_last(message, **kwargs))

    def stream_edit_last(
        self, message: str | Message | Sequence[Message], *, think: bool | str | None = None, **overrides: Any
    ) -> Iterator[Event]:
        turn = self._require_turn()
        messages = [{"role": "user", "content": message}] if isinstance(message, str) else message
        messages = [dict(messages)] if isinstance(messages, Mapping) else [dict(m) for m in messages]
        return self._redo(turn, messages, self.think if think is None else think, overrides)

    def _redo(
        self, turn: _Turn, messages: list[dict[str, Any]], think: bool | str | None, overrides: Mapping[str, Any]
    ) -> Iterator[Event]:
        """The last turn again, from the state before its message, with `messages`."""

        def redone() -> Iterator[Event]:
            del self._history[turn.history_index :]
            self._tokens, self._state, self._turn = turn.before, turn.before_entry, None
            yield from self._turn_events(messages, think, overrides)

        return redone()

    def _require_turn(self) -> _Turn:
        if self._turn is None:
            raise RuntimeError("no reply to go back to: send a message first")
        return self._turn

    def _prompt(self, messages: list[dict[str, Any]], think: bool | str | None) -> tuple[list[int], bool]:
        """The tokens the reply to `messages` follows, and whether they open <think>."""
        template, tokenizer = self.llm.tokenizer.chat_template, self.llm.tokenizer
        render_vars = {**template.thinking_vars(think), **self.template_vars}
        if self._tokens:
            marked = self._history[:-1] + [{"role": "assistant", "content": _MARKER}] + messages
            text = template.render(marked, tools=self.tools, **render_vars)
            if _MARKER in text:
                text = text[text.rindex(_MARKER) + len(_MARKER) :]
                ids = tokenizer.encode(text)
                if ids and ids[0] == self._tokens[-1] and ids[0] in tokenizer.eos_token_ids:
                    ids = ids[1:]  # the reply's own end token is in the state already
                return self._tokens + ids, opens_thinking(text)
        # the first turn, or a template that hides the last reply: the whole conversation
        text = template.render(self._history + messages, tools=self.tools, **render_vars)
        return tokenizer.encode(text), opens_thinking(text)

    def _turn_events(
        self, messages: list[dict[str, Any]], think: bool | str | None, overrides: Mapping[str, Any]
    ) -> Iterator[Event]:
        prompt, thinking = self._prompt(messages, think)
        turn = _Turn(self._tokens, self._state, messages, think, prompt, thinking, len(self._history))
        self._history.extend(messages)
        yield from self._reply(turn, overrides)

    def _reply(self, turn: _Turn, overrides: Mapping[str, Any]) -> Iterator[Event]:
        self._cancel.clear()

        def ended(handle: Handle | None) -> None:
            self._pins.extend(handle.entries.values() if handle else ())
            done = handle.done if handle else None
            if done is None or not done.stats.generated_tokens:  # refused, failed, or stopped before the reply began
                del self._history[turn.history_index :]
                self._tokens, self._state, self._turn = turn.before, turn.before_entry, None
            else:
                turn.prompt_entry = handle.entries.get("prompt", turn.prompt_entry)
                self._history.append(done.to_message())
                self._tokens, self._state, self._turn = handle.tokens, handle.entries.get("turn"), turn
            self._keep_pins([self._state, *self._turn_entries()])

        request = Request(
            turn.prompt,
            self.llm.options(self.options, **overrides),
            thinking=turn.thinking,
            tools=self.tools,
            cancel=self._cancel,
            next_turn=lambda tokens, _: tokens,
            pin=True,
        )
        return events(self.llm.engine, request, on_end=ended)

    def _turn_entries(self) -> list[Entry | None]:
        return [] if self._turn is None else [self._turn.before_entry, self._turn.prompt_entry]

    def _keep_pins(self, needed: Sequence[Entry | None]) -> None:
        """Hold one pin on each entry of `needed`, none on any other."""
        wanted = {id(e) for e in needed if e is not None}
        kept, cache = [], self.llm.prefix_cache
        for entry in self._pins:
            if id(entry) in wanted:
                wanted.discard(id(entry))
                kept.append(entry)
            else:
                cache.unpin(entry)
        self._pins[:] = kept


def _unpin(cache: PrefixCache, pins: list[Entry]) -> None:
    for entry in pins:
        cache.unpin(entry)
    pins.clear()
