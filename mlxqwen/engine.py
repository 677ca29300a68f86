"""The generation engine and the public generation API.

The engine drives any model runtime through `Backend`, a small token-level interface
(tokenizer, a cache, feed tokens / next-token logits, snapshot and restore), so the same
streaming, sampling, parsing, stop and stats logic serves MLX (`llm.py`) and llama.cpp
(`llama_cpp_backend.py`).
A subclass implements the token-level methods and gets `generate`, `stream` and `chat`.

Decoding is pipelined: token t+1 is computed (lazily, `mx.async_eval`) while token t is
being detokenized, parsed and handed to the caller. Every token handed out has already
been fed into the cache, so a `TokenCache` always knows exactly which tokens it holds,
whenever the caller stops reading."""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import mlx.core as mx

from .errors import ContextLimitError
from .events import Done, Event, PrefillProgress, Stats, TextDelta, ThinkingDelta, TokenLogprob, ToolCall
from .parsing import OutputParser, ParsedEvent, held_back, opens_thinking
from .sampling import Sampler, SamplingParams
from .tokenizer import Tokenizer

if TYPE_CHECKING:
    from .session import ChatSession

# MLX streams are per thread: generation can run in any thread (a UI worker) with this one.
_STREAM = mx.new_thread_local_stream(mx.default_device())

Message = Mapping[str, Any]
Prompt = str | Sequence[Message]


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


class Backend(ABC):
    """A model runtime as the engine sees it.

    Subclasses provide `tokenizer`, `defaults` (GenerationOptions), `max_context` and the
    five token-level methods; the public API (`generate`, `stream`, `chat`) is built here."""

    tokenizer: Tokenizer
    defaults: GenerationOptions
    max_context: int
    prefill_chunk: int = 512

    @abstractmethod
    def new_cache(self) -> Any:
        """An empty cache for one sequence."""

    @abstractmethod
    def prefill(self, cache: Any, tokens: list[int]) -> None:
        """Feed tokens into the cache and compute their state; no logits are needed."""

    @abstractmethod
    def forward(self, cache: Any, tokens: mx.array) -> mx.array:
        """Feed tokens (1-D ids, possibly not yet evaluated) and return the next-token logits
        [vocab], lazily where the runtime allows it."""

    @abstractmethod
    def snapshot(self, cache: Any) -> Any:
        """Something `restore` can bring the cache back to, cheaply."""

    @abstractmethod
    def restore(self, cache: Any, snapshot: Any) -> None: ...

    @abstractmethod
    def settle(self, cache: Any) -> None:
        """Finish pending work on the cache, so that the next turn can run in another thread."""

    @property
    def name(self) -> str:
        """The runtime, as users are shown it ("MLX", "llama.cpp")."""
        return type(self).__name__

    def peak_memory(self) -> int:
        """The most memory the runtime has held, in bytes: here MLX's allocator peak since the
        generation started."""
        return mx.get_peak_memory()

    # --- public API ---------------------------------------------------------------

    def options(self, options: GenerationOptions | None = None, **overrides: Any) -> GenerationOptions:
        """`options` (default: the checkpoint's recommended `defaults`) with `overrides` applied."""
        return replace(options or self.defaults, **overrides)

    def prompt_text(
        self,
        prompt: Prompt,
        *,
        system: str | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        think: bool | None = None,
        raw: bool = False,
        template_vars: Mapping[str, Any] | None = None,
    ) -> str:
        """What the model reads for `prompt`: a string is one user message (or, with raw=True or
        a model without a chat template, the text itself); a list is a conversation."""
        template = self.tokenizer.chat_template
        if isinstance(prompt, str) and (raw or template is None):
            return prompt
        if template is None:
            raise ValueError("this model has no chat template: pass the prompt as text (raw=True)")
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        if system is not None:
            messages.insert(0, {"role": "system", "content": system})
        return template.render(messages, tools=tools, **thinking_vars(think), **(template_vars or {}))

    def stream(
        self,
        prompt: Prompt,
        *,
        system: str | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        think: bool | None = None,
        raw: bool = False,
        template_vars: Mapping[str, Any] | None = None,
        options: GenerationOptions | None = None,
        cancel: threading.Event | None = None,
        **overrides: Any,
    ) -> Iterator[Event]:
        """Generate a reply to `prompt` as events: `ThinkingDelta`, `TextDelta`, `ToolCall`,
        `PrefillProgress` and, last, `Done` with the whole reply and its stats.

        think: turn the model's thinking on/off (None: the template's default).
        tools: JSON schemas of the tools the model may call.
        cancel: set it (from any thread) to stop; the last event is then Done("cancelled").
        overrides: any `GenerationOptions` field, e.g. temperature=0, max_tokens=100."""
        opts = self.options(options, **overrides)
        text = self.prompt_text(prompt, system=system, tools=tools, think=think, raw=raw, template_vars=template_vars)
        return generate_events(
            TokenCache(self),
            self.tokenizer.encode(text),
            opts,
            thinking=opens_thinking(text),
            tools=tools,
            cancel=cancel,
        )

    def generate(self, prompt: Prompt, **kwargs: Any) -> str:
        """The answer to `prompt` (without the thinking); same arguments as `stream`."""
        return last(self.stream(prompt, **kwargs)).text

    def chat(
        self,
        system: str | None = None,
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        think: bool | None = None,
        history: Sequence[Message] = (),
        template_vars: Mapping[str, Any] | None = None,
        options: GenerationOptions | None = None,
        **overrides: Any,
    ) -> ChatSession:
        """A multi-turn chat that keeps the model's cache between turns (see `ChatSession`)."""
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


def thinking_vars(think: bool | None) -> dict[str, Any]:
    return {} if think is None else {"enable_thinking": think}


def last(events: Iterator[Event]) -> Done:
    """Run a generation to its end and return its Done event."""
    done = None
    for event in events:
        done = event
    assert isinstance(done, Done)
    return done


class TokenCache:
    """A backend's cache together with the token ids it holds, in order."""

    def __init__(self, backend: Backend):
        self.backend = backend
        self.cache = backend.new_cache()
        self.tokens: list[int] = []

    def __len__(self) -> int:
        return len(self.tokens)

    def snapshot(self) -> tuple[Any, int]:
        return self.backend.snapshot(self.cache), len(self.tokens)

    def restore(self, snapshot: tuple[Any, int]) -> None:
        self.backend.restore(self.cache, snapshot[0])
        del self.tokens[snapshot[1] :]


class _StopStrings:
    """Cuts the text at the first stop string; holds back a tail that may start one."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.held = ""

    def push(self, text: str) -> tuple[str, bool]:
        text, self.held = self.held + text, ""
        hits = [i for s in self.stops if (i := text.find(s)) >= 0]
        if hits:
            return text[: min(hits)], True
        keep = held_back(text, self.stops)
        self.held = text[len(text) - keep :]
        return text[: len(text) - keep], False


class _Reply:
    """Collects one generation's events and timings into its Done."""

    def __init__(self, cached: int, logprobs: bool):
        self.cached = cached
        self.texts: list[str] = []
        self.thoughts: list[str] = []
        self.calls: list[ToolCall] = []
        self.logprobs: list[TokenLogprob] | None = [] if logprobs else None
        self.generated = 0
        self.start = time.perf_counter()
        self.first = 0.0

    def add(self, events: list[ParsedEvent]) -> list[ParsedEvent]:
        for event in events:
            if isinstance(event, TextDelta):
                self.texts.append(event.text)
            elif isinstance(event, ThinkingDelta):
                self.thoughts.append(event.text)
            else:
                self.calls.append(event)
        return events

    def done(self, context: TokenCache, reason: str) -> Done:
        end = time.perf_counter()
        prompt_time = (self.first if self.generated else end) - self.start
        fed = len(context) - self.cached - self.generated
        stats = Stats(
            prompt_tokens=fed,
            cached_tokens=self.cached,
            prompt_tps=fed / max(prompt_time, 1e-9),
            generated_tokens=self.generated,
            generation_tps=(self.generated - 1) / (end - self.first) if self.generated > 1 else 0.0,
            ttft=prompt_time,
            peak_memory=context.backend.peak_memory(),
            finish_reason="tool_calls" if reason == "stop" and self.calls else reason,
        )
        logprobs = None if self.logprobs is None else tuple(self.logprobs)
        return Done("".join(self.texts), "".join(self.thoughts), tuple(self.calls), stats, logprobs)


def generate_events(
    context: TokenCache,
    prompt: list[int],
    options: GenerationOptions,
    *,
    thinking: bool = False,
    tools: Sequence[Mapping[str, Any]] | None = None,
    cancel: threading.Event | None = None,
    after_prefill: Callable[[], None] | None = None,
) -> Iterator[Event]:
    """Feed `prompt` after what `context` holds, then generate; yields events, Done last.

    thinking: the prompt left `<think>` open. after_prefill: called once all prompt tokens
    but the last are in the cache (a chat takes its turn snapshot there)."""
    backend = context.backend
    if not prompt:
        raise ValueError("the prompt is empty")
    room = backend.max_context - len(context) - len(prompt)
    if room < 1:
        raise ContextLimitError(
            f"the prompt needs {len(prompt)} tokens after {len(context)} already in the context, "
            f"over the maximum context of {backend.max_context}: start a new chat or load the model "
            "with a larger max_context"
        )
    max_new = room if options.max_tokens is None else min(room, options.max_tokens)
    cancelled = cancel.is_set if cancel is not None else lambda: False

    with mx.stream(_STREAM):
        try:
            mx.reset_peak_memory()
            reply = _Reply(len(context), options.logprobs is not None)
            head, chunk = prompt[:-1], backend.prefill_chunk
            for i in range(0, len(head), chunk):
                if cancelled():  # once the prompt is in, the first token comes whatever happens
                    yield reply.done(context, "cancelled")
                    return
                backend.prefill(context.cache, head[i : i + chunk])
                context.tokens.extend(head[i : i + chunk])
                if len(head) > chunk:
                    yield PrefillProgress(min(i + chunk, len(head)), len(head))
            if after_prefill is not None:
                after_prefill()

            sampler = Sampler(options, context.tokens + prompt[-1:], options.logprobs)
            detokenizer = backend.tokenizer.detokenizer()
            parser = OutputParser(thinking=thinking, tools=tools)
            stops = _StopStrings(options.stop)
            eos = backend.tokenizer.eos_token_ids

            sample = sampler(backend.forward(context.cache, mx.array(prompt[-1:])))
            context.tokens.append(prompt[-1])
            mx.async_eval(*sample)
            stopped = False
            while True:
                # feed token t (not yet known on the host) and queue t+1 before reading t
                next_sample = sampler(backend.forward(context.cache, sample.token.reshape(1)))
                mx.async_eval(*next_sample)
                token = sample.token.item()
                context.tokens.append(token)
                reply.generated += 1
                if reply.generated == 1:
                    reply.first = time.perf_counter()
                if reply.logprobs is not None:
                    top = (
                        ()
                        if sample.top_ids is None
                        else zip(sample.top_ids.tolist(), sample.top_logprobs.tolist(), strict=True)
                    )
                    reply.logprobs.append(TokenLogprob(token, sample.logprob.item(), tuple(top)))
                if token in eos:
                    reason = "stop"
                    break
                text, stopped = stops.push(detokenizer.add(token))
                yield from reply.add(parser.feed(text))
                if stopped:
                    reason = "stop"
                    break
                if reply.generated >= max_new:
                    reason = "length"
                    break
                if cancelled():
                    reason = "cancelled"
                    break
                sample = next_sample
            if not stopped:
                text, _ = stops.push(detokenizer.flush())
                yield from reply.add(parser.feed(text + stops.held))
            yield from reply.add(parser.finish())
            yield reply.done(context, reason)
        finally:
            backend.settle(context.cache)
