"""`LLM`, what `mlxqwen.load` returns: a model behind the engine, with the public API
(`generate`, `stream`, `chat`). Prompts are rendered with the model's chat template and
tokenized here, in the caller's thread; the engine runs them, batched with every other request.

A conversation resent whole (as every HTTP client does) is not read again: each request names
the tokens the conversation will start with next turn (the template renders earlier replies
without their thinking), and the engine keeps the state there."""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from .backends.runtime import Runtime
from .engine import Engine, Handle, Request
from .events import Done, Event
from .parsing import opens_thinking
from .prefix_cache import PrefixCache
from .sampling import GenerationOptions
from .tokenizer import Tokenizer

if TYPE_CHECKING:
    from .session import ChatSession

Message = Mapping[str, Any]
Prompt = str | Sequence[Message]

_MARKER = "\u2063MLXQWEN-MARK\u2063"
_TURN_START = "<|im_start|>"


class LLM:
    """A loaded model. `model`, `config` and `new_cache()` give the MLX model itself (MLX backend);
    `name` says which runtime runs it ("MLX" or "llama.cpp")."""

    def __init__(
        self,
        runtime: Runtime,
        prefix_cache: PrefixCache,
        max_concurrent: int = 8,
        max_queue: int = 64,
        mtp_depth: int | None = None,
    ):
        self.runtime = runtime
        self.prefix_cache = prefix_cache
        self.engine = Engine(runtime, prefix_cache, max_concurrent, max_queue, mtp_depth)
        # Not at exit: an MLX thread that ends while the process exits can abort it.
        weakref.finalize(self, self.engine.close).atexit = False

    @property
    def name(self) -> str:
        return self.runtime.name

    @property
    def tokenizer(self) -> Tokenizer:
        return self.runtime.tokenizer

    @property
    def defaults(self) -> GenerationOptions:
        """The checkpoint's recommended sampling."""
        return self.runtime.defaults

    @property
    def max_context(self) -> int:
        return self.runtime.max_context

    @property
    def model(self) -> Any:
        return self.runtime.model

    @property
    def config(self) -> Any:
        """The model's `ModelConfig` (MLX backend)."""
        return getattr(self.runtime, "config", None)

    @property
    def path(self) -> Any:
        return self.runtime.path

    def new_cache(self) -> list[Any]:
        """Per-layer caches for calling `model` directly (MLX backend)."""
        return self.runtime.new_cache()

    def close(self) -> None:
        """Stop the engine once its requests are done and free the model (else that happens when
        this object is collected)."""
        self.engine.close(wait=True)
        self.runtime.close()

    def options(self, options: GenerationOptions | None = None, **overrides: Any) -> GenerationOptions:
        """`options` (default: the checkpoint's recommended `defaults`) with `overrides` applied."""
        return replace(options or self.defaults, **overrides)

    def prompt_text(
        self,
        prompt: Prompt,
        *,
        system: str | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        think: bool | str | None = None,
        raw: bool = False,
        template_vars: Mapping[str, Any] | None = None,
    ) -> str:
        """What the model reads for `prompt`: a string is one user message (or, with raw=True or
        a model without a chat template, the text itself); a list is a conversation."""
        if isinstance(prompt, str) and (raw or self.tokenizer.chat_template is None):
            return prompt
        return self._render(self._messages(prompt, system), tools, think, template_vars)

    def stream(
        self,
        prompt: Prompt,
        *,
        system: str | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        think: bool | str | None = None,
        raw: bool = False,
        template_vars: Mapping[str, Any] | None = None,
        options: GenerationOptions | None = None,
        cancel: threading.Event | None = None,
        **overrides: Any,
    ) -> Iterator[Event]:
        """Generate a reply to `prompt` as events: `ThinkingDelta`, `TextDelta`, `ToolCall`,
        `PrefillProgress` and, last, `Done` with the whole reply and its stats.

        think: turn the model's thinking on/off (None: the template's default), or a level the
            template takes (Qwen3.8: "low", "medium", "xhigh"; see `ChatTemplate.thinking_levels`).
        tools: JSON schemas of the tools the model may call.
        cancel: set it (from any thread) to stop; the last event is then Done("cancelled").
        overrides: any `GenerationOptions` field, e.g. temperature=0, max_tokens=100.
        Calls from several threads run together."""
        opts = self.options(options, **overrides)
        text = self.prompt_text(prompt, system=system, tools=tools, think=think, raw=raw, template_vars=template_vars)
        tokens = self.tokenizer.encode(text)
        request = Request(tokens, opts, thinking=opens_thinking(text), tools=tools, cancel=cancel)
        if text is prompt:  # raw text: it continues as generated
            request.next_turn = lambda generated, done: generated
        else:
            messages = self._messages(prompt, system)
            render = dict(tools=tools, think=think, template_vars=template_vars)
            request.next_turn = lambda generated, done: self._turn_tokens(messages + [done.to_message()], **render)
            if not self.runtime.trimmable:  # a recurrent state is kept only where a request asks
                reply_start = self._turn_tokens(messages + [{"role": "assistant", "content": _MARKER}], **render)
                request.keep = (_shared(tokens, reply_start),)
        return events(self.engine, request)

    def generate(self, prompt: Prompt, **kwargs: Any) -> str:
        """The answer to `prompt` (without the thinking); same arguments as `stream`."""
        return last(self.stream(prompt, **kwargs)).text

    def chat(
        self,
        system: str | None = None,
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        think: bool | str | None = None,
        history: Sequence[Message] = (),
        template_vars: Mapping[str, Any] | None = None,
        options: GenerationOptions | None = None,
        **overrides: Any,
    ) -> ChatSession:
        """A multi-turn chat that keeps the model's state between turns (see `ChatSession`)."""
        from .session import ChatSession

        return ChatSession(
            self,
            system=system,
            tools=tools,
            think=think,
            history=history,
            template_vars=template_vars,
            options=self.options(options, **overrides),
        )

    # --- rendering -------------------------------------------------------------------------

    def _messages(self, prompt: Prompt, system: str | None) -> list[dict[str, Any]]:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
        if system is not None:
            messages.insert(0, {"role": "system", "content": system})
        return messages

    def _render(
        self,
        messages: list[dict[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None,
        think: bool | str | None,
        template_vars: Mapping[str, Any] | None,
        add_generation_prompt: bool = True,
    ) -> str:
        template = self.tokenizer.chat_template
        if template is None:
            raise ValueError("this model has no chat template: pass the prompt as text (raw=True)")
        return template.render(
            messages,
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            **template.thinking_vars(think),
            **(template_vars or {}),
        )

    def _turn_tokens(self, messages: list[dict[str, Any]], **render: Any) -> list[int]:
        """The tokens a conversation ending in `messages` starts with when another message follows."""
        text = self._render(messages + [{"role": "user", "content": _MARKER}], add_generation_prompt=False, **render)
        text = text[: text.index(_MARKER)]
        if _TURN_START in text:
            text = text[: text.rindex(_TURN_START)]
        return self.tokenizer.encode(text)


def _shared(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def events(engine: Engine, request: Request, on_end: Callable[[Handle | None], None] | None = None) -> Iterator[Event]:
    """Submit `request` when the caller starts reading, and yield its events. A caller that stops
    early cancels it; its end is awaited either way, then `on_end(handle)` (`on_end(None)` when
    it was refused), so that what it leaves in the cache is settled."""
    try:
        handle = engine.submit(request)
    except Exception:
        if on_end is not None:
            on_end(None)
        raise
    try:
        yield from handle
    finally:
        if not handle.read:
            handle.cancel()
            for _ in handle:
                pass
        if on_end is not None:
            on_end(handle)


def last(events: Iterator[Event]) -> Done:
    """Run a generation to its end and return its Done event."""
    done = None
    for event in events:
        done = event
    assert isinstance(done, Done)
    return done
