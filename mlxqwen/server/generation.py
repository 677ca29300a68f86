"""One request's generation: `llm.stream(...)` run in a worker thread, its events handed to the
event loop. The engine runs many such streams together and resumes each from the longest
cached prefix of its tokens; here a request only starts its stream, reads it, and cancels it
when the client goes away.

Also the one mapping from the dialects' thinking settings (Ollama's `think`, OpenAI's
`reasoning_effort`, Anthropic's thinking budget) to what the model's chat template accepts."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from starlette.requests import Request

from ..chat_template import ChatTemplate
from ..events import Done, Event
from ..llm import LLM
from .errors import APIError, api_error
from .pool import ModelPool, Resident

_END = object()


class Generation:
    """`resident.llm.stream(prompt, **kwargs)` in a worker thread. `start()` waits for the first
    event, so that a request refused by the engine (full queue, prompt over the context) gets
    its HTTP status before any byte of the response; then `events()` yields them all."""

    def __init__(self, pool: ModelPool, resident: Resident, request: Request, prompt: Any, kwargs: dict[str, Any]):
        self.pool, self.resident, self.request = pool, resident, request
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.cancel = threading.Event()
        self.started = time.perf_counter()
        self.done: Done | None = None
        self.load_seconds = 0.0  # waiting for the model to load, when this request loaded it
        self._first: Any = None
        self._watcher: asyncio.Task | None = None
        request.state.model = resident.model.name
        thread = threading.Thread(target=self._run, args=(prompt, kwargs), daemon=True, name="mlxqwen-generation")
        thread.start()

    def _run(self, prompt: Any, kwargs: dict[str, Any]) -> None:
        try:
            for event in self.resident.llm.stream(prompt, cancel=self.cancel, **kwargs):
                self._put(event)
        except BaseException as e:  # handed to the request, which answers with it
            self._put(e)
        finally:
            self._put(_END)
            self._call(self.pool.release, self.resident)  # whatever became of the request

    def _put(self, item: Any) -> None:
        self._call(self.queue.put_nowait, item)

    def _call(self, function: Any, *args: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(function, *args)
        except RuntimeError:  # the server stopped while this generation ran
            self.cancel.set()

    async def start(self) -> None:
        """Wait for the first event; an error raised before it becomes an APIError."""
        self._watcher = asyncio.create_task(self._watch_disconnect())
        self._first = await self.queue.get()
        if isinstance(self._first, BaseException) or self._first is _END:
            self._stop_watching()
            if self._first is _END:
                raise APIError(500, "the generation ended without a reply", "server")
            raise api_error(self._first)

    async def _watch_disconnect(self) -> None:
        while (await self.request.receive())["type"] != "http.disconnect":
            pass
        self.cancel.set()

    async def events(self) -> AsyncIterator[Event]:
        """Every event, Done last. An error after the first event is raised as an APIError."""
        item = self._first
        try:
            while item is not _END:
                if isinstance(item, BaseException):
                    raise api_error(item)
                if isinstance(item, Done):
                    self.done = item
                    self._record(item)
                yield item
                item = await self.queue.get()
        finally:  # no await here: a cancelled response cancels every await in it
            self.cancel.set()  # the client left (or the response failed): stop generating
            self._stop_watching()

    async def reply(self) -> Done:
        """Run to the end; the Done event."""
        async for _ in self.events():
            pass
        assert self.done is not None
        return self.done

    def _stop_watching(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()

    def _record(self, done: Done) -> None:
        """What the request's log line reports."""
        s = done.stats
        self.request.state.tokens = (s.prompt_tokens + s.cached_tokens, s.generated_tokens)
        self.request.state.tps = s.generation_tps


async def start_generation(
    request: Request,
    model: str,
    keep_alive: float | None,
    build: Callable[[LLM], tuple[Any, dict[str, Any]]],
) -> Generation:
    """Acquire `model`, build `llm.stream`'s prompt and arguments with `build(llm)` (which may
    raise an APIError), start it and wait for its first event."""
    pool: ModelPool = request.app.state.pool
    start = time.perf_counter()
    resident = await pool.acquire(model, keep_alive)
    try:
        prompt, kwargs = build(resident.llm)
    except BaseException:
        pool.release(resident)
        raise
    generation = Generation(pool, resident, request, prompt, kwargs)
    generation.load_seconds = generation.started - start
    await generation.start()
    return generation


def think_setting(template: ChatTemplate | None, value: bool | str | None) -> dict[str, Any]:
    """Template variables for a request's thinking setting: True/False; a level the template
    accepts (else a 400 naming them); on a template without levels any level but "none" is
    thinking on."""
    if template is None or value is None:
        return {}
    if isinstance(value, str) and not template.thinking_levels:
        value = value != "none"
    elif value == "none":
        value = False
    try:
        return template.thinking_vars(value)
    except ValueError as e:
        raise APIError(400, str(e)) from None


# Anthropic thinking budgets at which the next effort level starts
_BUDGET_STEPS = (4096, 16384)


def budget_setting(template: ChatTemplate | None, thinking: Mapping[str, Any] | None) -> dict[str, Any]:
    """Anthropic's `thinking` ({"type": "enabled", "budget_tokens": N} or "disabled") onto the
    template: on/off, or for a template with levels the level of the budget (under 4096 tokens
    the lowest, under 16384 the middle one, else the highest)."""
    if thinking is None or template is None:
        return {}
    if not isinstance(thinking, Mapping) or thinking.get("type") not in ("enabled", "disabled", "adaptive"):
        raise APIError(400, "thinking: expected {'type': 'enabled', 'budget_tokens': N} or {'type': 'disabled'}")
    if thinking["type"] == "disabled":
        return think_setting(template, False)
    levels = template.thinking_levels
    budget = thinking.get("budget_tokens")
    if not levels or not isinstance(budget, int):
        return think_setting(template, True)
    step = sum(budget >= b for b in _BUDGET_STEPS)
    return think_setting(template, levels[round(step * (len(levels) - 1) / len(_BUDGET_STEPS))])
