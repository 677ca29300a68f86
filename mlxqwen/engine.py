"""The engine: requests from any number of threads, run together on one runtime.

`Engine.submit` takes a `Request` (prompt token ids, options) and returns a `Handle` whose
iteration yields the request's events. One engine thread does all the model work, in a loop:
- admit waiting requests while there is room (`max_concurrent` sequences, and K/V capacity for
  their prompts); a full queue (`max_queue`) refuses a request with `QueueFullError`;
- read one prefill chunk of one prompt (each request resumes from the longest prefix the
  `PrefixCache` holds), so streams already running keep flowing while a prompt is read;
- one decode step: one forward over every sequence that is generating, each sampled with its
  own options.
Decoding is pipelined: step t+1 is computed (lazily, `mx.async_eval`) while the tokens of step t
are detokenized, parsed and handed out. When a running sequence would need K/V the machine does
not have, the youngest is put back in the queue (its state dropped, recomputed when it resumes).

After a request, the prefix cache keeps the state at the end of its prompt, at the boundaries
the request names, and at the end of its reply as the next turn will start (`next_turn`): when
that differs from what was generated (chat templates drop earlier turns' thinking), the state
is computed for it once, right after the reply, so the next request only reads what is new."""

from __future__ import annotations

import atexit
import logging
import queue
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx

from .backends.runtime import Runtime
from .errors import ContextLimitError, QueueFullError
from .events import Done, Event, PrefillProgress, Stats, TextDelta, ThinkingDelta, TokenLogprob, ToolCall
from .parsing import OutputParser, ParsedEvent, held_back
from .prefix_cache import Entry, PrefixCache
from .sampling import GenerationOptions, Sample, Sampler
from .speculative import DepthChooser, accept
from .structured import JsonConstraint

# MLX streams are per thread; the engine thread runs on this one.
_STREAM = mx.new_thread_local_stream(mx.default_device())
_BLOCK = 256  # K/V is counted in blocks of this many positions, as the caches grow
_log = logging.getLogger("mlxqwen")


_engines: weakref.WeakSet[Engine] = weakref.WeakSet()
_exiting = False

# Engine threads never end. A thread's end runs MLX's thread-local destructors (its compile cache
# holds Python functions, so they take the GIL), and a thread that ends while the interpreter shuts
# down aborts the process ("terminate called without an active exception"). A closed engine's
# thread waits here for the next engine's loop instead.
_parked: queue.SimpleQueue[queue.SimpleQueue[Callable[[], None]]] = queue.SimpleQueue()
_ending = 0  # closed engines whose threads have not yet let go of them
_released = threading.Condition()


def _run_on_engine_thread(loop: Callable[[], None]) -> None:
    try:
        inbox = _parked.get_nowait()
    except queue.Empty:
        inbox = queue.SimpleQueue()
        threading.Thread(target=_engine_thread, args=(inbox,), name="mlxqwen-engine", daemon=True).start()
    inbox.put(loop)


def _engine_thread(inbox: queue.SimpleQueue[Callable[[], None]]) -> None:
    global _ending
    while True:
        loop = inbox.get()
        loop()
        del loop  # the engine, freed here when this was the last reference
        _parked.put(inbox)
        with _released:
            _ending -= 1
            _released.notify_all()


@atexit.register
def _settle() -> None:
    # The process ending while an engine thread computes aborts it (MLX's streams are torn down
    # under it): stop their work and wait until they are idle, and from now on leave them blocked.
    global _exiting
    _exiting = True
    for engine in list(_engines):
        engine._stop_and_wait(timeout=30)
    with _released:
        _released.wait_for(lambda: _ending <= 0, timeout=30)


@dataclass
class Request:
    """prompt: token ids. thinking: the prompt left `<think>` open. tools: the schemas given to
    the template (they type XML tool-call parameters). keep: prompt lengths whose state the prefix
    cache should keep (turn boundaries). next_turn(tokens, done): the tokens the next turn of
    this conversation will start with, given the sequence's tokens and the reply; the state is
    kept there. pin: the kept entries are pinned for the caller (see `Handle.entries`)."""

    prompt: list[int]
    options: GenerationOptions
    thinking: bool = False
    tools: Sequence[Mapping[str, Any]] | None = None
    cancel: threading.Event | None = None
    keep: tuple[int, ...] = ()
    next_turn: Callable[[list[int], Done], list[int] | None] | None = None
    pin: bool = False


class Handle:
    """A submitted request: iterate it for its events (Done last). `done`, `tokens` (the
    sequence's tokens) and `entries` (the pinned prefix-cache entries: "prompt", "turn" and each
    kept length) are set once it is done."""

    def __init__(self, request: Request):
        self.request = request
        self.tokens: list[int] = []
        self.entries: dict[str | int, Entry] = {}
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._cancel = request.cancel or threading.Event()
        self.done: Done | None = None
        self.read = False  # its Done (or error) has been read
        self.finished = threading.Event()

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def __iter__(self) -> Iterator[Event]:
        while not self.read:
            event = self._events.get()
            self.read = isinstance(event, (Done, BaseException))
            if isinstance(event, BaseException):
                raise event
            yield event


class _Text:
    """The text side of one generation: detokenizing, stop strings, parsing, and the reply so far."""

    def __init__(self, runtime: Runtime, request: Request):
        self.detokenizer = runtime.tokenizer.detokenizer()
        self.parser = OutputParser(thinking=request.thinking, tools=request.tools)
        self.stops = [s for s in request.options.stop if s]
        self.held = ""  # text that may be the start of a stop string
        self.texts: list[str] = []
        self.thoughts: list[str] = []
        self.calls: list[ToolCall] = []

    def add(self, token: int) -> tuple[list[ParsedEvent], bool]:
        """The events of one more token, and whether a stop string ended the text."""
        text, self.held = self.held + self.detokenizer.add(token), ""
        hits = [i for s in self.stops if (i := text.find(s)) >= 0]
        if hits:
            return self._parsed(text[: min(hits)]), True
        keep = held_back(text, self.stops)
        self.held = text[len(text) - keep :]
        return self._parsed(text[: len(text) - keep]), False

    def finish(self, stopped: bool) -> list[ParsedEvent]:
        events = [] if stopped else self._parsed(self.detokenizer.flush() + self.held)
        return events + self._collect(self.parser.finish())

    def _parsed(self, text: str) -> list[ParsedEvent]:
        return self._collect(self.parser.feed(text))

    def _collect(self, events: list[ParsedEvent]) -> list[ParsedEvent]:
        for event in events:
            if isinstance(event, TextDelta):
                self.texts.append(event.text)
            elif isinstance(event, ThinkingDelta):
                self.thoughts.append(event.text)
            else:
                self.calls.append(event)
        return events


@dataclass(eq=False)
class _Stream:
    """A request as the scheduler runs it."""

    handle: Handle
    submitted: float
    feed: list[int] = field(default_factory=list)  # tokens to prefill before decoding starts
    first_input: int = 0  # the token fed at the first decode step
    seq: Any = None
    tokens: list[int] = field(default_factory=list)  # what the sequence holds
    cached: int = 0
    fed: int = 0  # prompt tokens computed (not from the cache)
    position: int = 0  # next index of `feed` to prefill
    decoding: bool = False
    next_input: mx.array | None = None  # the token the next decode step feeds
    launched: Sample | None = None  # the draw of the last decode step, not yet handed out
    sampler: Sampler | None = None
    text: _Text | None = None
    generated: int = 0
    drafted: int = 0  # tokens the MTP head guessed
    accepted: int = 0  # of them, kept
    max_new: int = 0
    first_token: float = 0.0
    logprobs: list[TokenLogprob] | None = None
    constraint: JsonConstraint | None = None  # the answer's format (GenerationOptions.format)
    constrained: bool = False  # the constraint applies now (not while the model thinks)

    @property
    def request(self) -> Request:
        return self.handle.request


@dataclass(eq=False)
class _Warm:
    """Computes the state for a next turn's tokens, to keep it in the prefix cache."""

    tokens: list[int]
    handle: Handle | None  # pins the entry for this request's caller
    seq: Any = None
    position: int = 0


class Engine:
    def __init__(
        self,
        runtime: Runtime,
        prefix_cache: PrefixCache,
        max_concurrent: int = 8,
        max_queue: int = 64,
        mtp_depth: int | None = None,
    ):
        """mtp_depth: tokens the MTP head guesses per step (None: chosen as it pays, see `DepthChooser`)."""
        if max_concurrent < 1 or max_queue < 0:
            raise ValueError("max_concurrent must be at least 1 and max_queue at least 0")
        self.runtime = runtime
        self.prefix_cache = prefix_cache
        self.max_concurrent = max_concurrent
        self.max_queue = max_queue
        self._incoming: list[_Stream] = []
        self._lock = threading.Condition()
        self._started = False
        self._loop_ended = threading.Event()
        self._thread: threading.Thread | None = None  # the one running the loop
        self._closing = False
        self._idle = True
        self._stopping = False  # the process is ending: drop what is left
        self._waiting: deque[_Stream] = deque()
        self._active: list[_Stream] = []
        self._warm: deque[_Warm] = deque()
        self._think_close = runtime.tokenizer.token_to_id("</think>")
        self.depths = DepthChooser(fixed=mtp_depth)
        self._last_step: tuple[int, int, float, list[int]] | None = None  # depth, batch, start, guesses kept
        self._timed = False  # whether only the last step ran since it started: then its time is its own

    # --- the callers' side ----------------------------------------------------------------

    def submit(self, request: Request) -> Handle:
        """Queue `request`; its events come from iterating the returned handle."""
        runtime = self.runtime
        if not request.prompt:
            raise ValueError("the prompt is empty")
        if len(request.prompt) >= runtime.max_context:
            raise ContextLimitError(
                f"the prompt has {len(request.prompt)} tokens, and the maximum context is {runtime.max_context}: "
                "start a new chat or load the model with a larger max_context"
            )
        handle = Handle(request)
        stream = _Stream(handle, time.perf_counter(), request.prompt[:-1], request.prompt[-1])
        if request.options.format is not None:  # a schema it cannot use is refused here, in the caller's thread
            stream.constraint = JsonConstraint(runtime.tokenizer, request.options.format, runtime.vocab_size)
            stream.constrained = not request.thinking
        with self._lock:
            if len(self._incoming) + len(self._waiting) >= self.max_queue + max(
                0, self.max_concurrent - len(self._active)
            ):
                raise QueueFullError(
                    f"{len(self._incoming) + len(self._waiting)} requests are waiting (max_queue={self.max_queue}): "
                    "try again in a moment"
                )
            self._incoming.append(stream)
            if not self._started:
                self._started = True
                _run_on_engine_thread(self._run)
                _engines.add(self)
            self._lock.notify()
        return handle

    def close(self, wait: bool = False) -> None:
        """End the engine's loop once the requests in flight are done (wait: until it has)."""
        global _ending
        if _exiting:  # a loop ending now would run into the interpreter's shutdown
            return
        with self._lock:
            if self._started and not self._closing:
                with _released:
                    _ending += 1
            self._closing = True
            self._lock.notify()
            started = self._started
        if wait and started and self._thread is not threading.current_thread():
            self._loop_ended.wait()

    # --- the engine thread ------------------------------------------------------------------

    def _stop_and_wait(self, timeout: float) -> None:
        """Cancel every request, drop pending work, wait for the engine thread to be idle and the
        prefix cache's files to be written."""
        with self._lock:
            self._stopping = True
            for stream in [*self._incoming, *self._waiting, *self._active]:
                stream.handle.cancel()
            self._lock.wait_for(lambda: self._idle, timeout)
        self.prefix_cache.flush()  # a writer thread cut off by the interpreter's end aborts the process

    def _run(self) -> None:
        # One thread for the engine's life: MLX arrays are bound to the thread that made them.
        self._thread = threading.current_thread()
        try:
            with mx.stream(_STREAM):
                self._loop()
        finally:
            self._loop_ended.set()

    def _loop(self) -> None:
        while True:
            with self._lock:
                if self._stopping:
                    self._warm.clear()
                self._idle = not (self._incoming or self._waiting or self._active or self._warm)
                if self._idle:
                    self._timed = False  # the wait is not a step's time
                    mx.clear_cache()  # MLX keeps freed buffers for reuse; idle, they go back to the system
                self._lock.notify_all()
                while not (self._incoming or self._waiting or self._active or self._warm or self._closing):
                    self._lock.wait()
                self._idle = False
                self._waiting.extend(self._incoming)
                self._incoming.clear()
                if self._closing and not (self._waiting or self._active or self._warm):
                    return
            try:
                self._step()
            except Exception as e:  # the runtime failed: every request in flight gets the error
                self._fail(e)

    def _step(self) -> None:
        self._admit()
        if self._warm:
            self._warm_chunk(self._warm[0])
            self._timed = False
        elif prefilling := [s for s in self._active if not s.decoding]:
            self._prefill_chunk(prefilling[0])
            self._timed = False
        self._decode_step()

    def _fail(self, error: Exception) -> None:
        for stream in [*self._active, *self._waiting]:
            stream.handle._events.put(error)
            stream.handle.finished.set()
        for item in [*self._active, *self._warm]:
            if item.seq is not None:
                self.runtime.release(item.seq)
        self._active.clear()
        self._waiting.clear()
        self._warm.clear()
        self.runtime.settle()

    def _blocks(self, tokens: int) -> int:
        return -(-tokens // _BLOCK) * _BLOCK

    def _used(self, growth: int = 0) -> int:
        """K/V positions that live sequences hold, each grown by `growth` tokens."""
        held = [max(len(s.tokens), len(s.feed)) + 1 + growth for s in self._active]
        held += [len(w.tokens) for w in self._warm]
        return sum(self._blocks(n) for n in held)

    def _admit(self) -> None:
        while self._waiting:
            stream = self._waiting[0]
            if stream.handle.cancelled:
                self._waiting.popleft()
                self._finish(stream, "cancelled")
                continue
            if len(self._active) >= self.max_concurrent:
                return
            need = self._blocks(len(stream.feed) + 1)
            if self._used() + need > self.runtime.kv_capacity:
                if self._active or self._warm:
                    return  # waits for room
                self._waiting.popleft()
                stream.handle._events.put(
                    ContextLimitError(
                        f"the prompt needs {need} tokens of K/V, and this model's memory holds "
                        f"{self.runtime.kv_capacity}: shorten it or load a smaller model"
                    )
                )
                continue
            self._waiting.popleft()
            self._active.append(stream)

    # --- prefill --------------------------------------------------------------------------------

    def _start(self, stream: _Stream) -> None:
        runtime, request = self.runtime, stream.request
        stream.seq = runtime.new_sequence()
        prompt = stream.feed + [stream.first_input]
        entry, n = self.prefix_cache.lookup(prompt)
        snapshot = self.prefix_cache.take(entry) if entry is not None else None
        if snapshot is None:
            n = 0
        else:
            runtime.restore(stream.seq, snapshot, n)
        stream.tokens = prompt[:n]
        stream.position = n
        if stream.sampler is None:  # not a sequence resumed after preemption
            stream.cached = n
            stream.sampler = Sampler(request.options, request.prompt, request.options.logprobs)
            stream.text = _Text(runtime, request)
            stream.logprobs = [] if request.options.logprobs is not None else None
            room = runtime.max_context - len(request.prompt)
            stream.max_new = room if request.options.max_tokens is None else min(room, request.options.max_tokens)
            if not self._active_decoding():
                mx.reset_peak_memory()

    def _prefill_chunk(self, stream: _Stream) -> None:
        if stream.seq is None:
            self._start(stream)
        if stream.handle.cancelled:  # once the prompt is in, the first token comes whatever happens
            self._finish(stream, "cancelled")
            return
        feed, request = stream.feed, stream.request
        end = min(len(feed), stream.position + self.runtime.prefill_chunk)
        end = min([end] + [k for k in request.keep if stream.position < k < end])
        if end > stream.position:
            chunk = feed[stream.position : end]
            self.runtime.prefill(stream.seq, chunk)
            stream.tokens += chunk
            stream.fed += len(chunk)
            stream.position = end
            if len(feed) > self.runtime.prefill_chunk and stream.generated == 0:
                stream.handle._events.put(PrefillProgress(end, len(feed)))
            if end in request.keep:
                self._keep(stream.handle, end, stream.tokens, stream.seq)
        if stream.position == len(feed):
            if stream.generated == 0:
                self._keep(stream.handle, "prompt", stream.tokens, stream.seq)
            stream.decoding = True
            stream.next_input = mx.array([stream.first_input])

    def _keep(self, handle: Handle | None, name: str | int, tokens: list[int], seq: Any) -> None:
        """Store the state of `seq` (which holds `tokens`) in the prefix cache."""
        if not tokens:
            return
        pin = handle is not None and handle.request.pin
        entry = self.prefix_cache.store(list(tokens), self.runtime.snapshot(seq), pin=pin)
        if pin and entry is not None:
            previous = handle.entries.pop(name, None)
            if previous is not None:
                self.prefix_cache.unpin(previous)
            handle.entries[name] = entry

    def _warm_chunk(self, warm: _Warm) -> None:
        runtime = self.runtime
        if warm.seq is None:
            warm.seq = runtime.new_sequence()
            entry, n = self.prefix_cache.lookup(warm.tokens + [0])  # any prefix up to all of its tokens
            snapshot = self.prefix_cache.take(entry) if entry is not None else None
            if snapshot is not None:
                runtime.restore(warm.seq, snapshot, n)
                warm.position = n
        end = min(len(warm.tokens), warm.position + runtime.prefill_chunk)
        if end > warm.position:
            runtime.prefill(warm.seq, warm.tokens[warm.position : end])
            warm.position = end
        if warm.position == len(warm.tokens):
            self._keep(warm.handle, "turn", warm.tokens, warm.seq)
            runtime.release(warm.seq)
            self._warm.popleft()
            if warm.handle is not None:
                warm.handle.finished.set()

    # --- decode ---------------------------------------------------------------------------------

    def _active_decoding(self) -> list[_Stream]:
        return [s for s in self._active if s.decoding]

    def _decode_step(self) -> None:
        streams = self._active_decoding()
        if not streams:
            return
        streams = self._make_room(streams)
        now = time.perf_counter()
        if self._last_step is not None:  # a step's time: to the next one, when nothing else ran between
            depth, batch, start, kept = self._last_step
            self.depths.record(depth, batch, now - start if self._timed else None, kept)
        self._timed = True
        constrained = any(s.constraint is not None for s in streams)
        depth = self.depths.choose(len(streams)) if self.runtime.mtp and not constrained else 0
        if depth and self._last_step is not None and self._last_step[0] == 0:
            # The head reads what plain steps fed it in one pass: a cost of those steps, not of
            # this one, whose time says what drafting costs (counted in it, probes looked dearer)
            self.runtime.catch_up([s.seq for s in streams])
            now = time.perf_counter()
        kept = self._speculative_step(streams, depth) if depth else self._plain_step(streams)
        self._last_step = (depth, len(streams), now, kept)

    def _plain_step(self, streams: list[_Stream]) -> list[int]:
        inputs = mx.concatenate([s.next_input for s in streams])
        logits = self.runtime.decode([s.seq for s in streams], inputs)
        handed = []
        for i, stream in enumerate(streams):
            handed.append((stream, stream.launched))
            if stream.launched is None:  # its first step: the prompt's last token was fed
                stream.tokens.append(stream.first_input)
                stream.fed += 1
            if stream.constraint is None:
                self._draw(stream, logits[i])
        for stream, sample in handed:
            if sample is not None and (end := self._hand_out(stream, sample)):
                self._finish(stream, *end)
        # a constrained draw needs the token before it (handed out just now) for its mask
        for i, stream in enumerate(streams):
            if stream.constraint is not None and stream in self._active:
                self._draw(stream, logits[i], stream.constraint.mask() if stream.constrained else None)
        return []

    def _speculative_step(self, streams: list[_Stream], depth: int) -> list[int]:
        """The MTP head guesses `depth` tokens per sequence, the model checks them in one pass, and
        each sequence keeps what `speculative.accept` accepts (see `mlxqwen.speculative`). Returns
        how many guesses each kept."""
        seqs = [s.seq for s in streams]
        nexts = mx.concatenate([s.next_input for s in streams])
        drafts: list[list[mx.array]] = [[] for _ in streams]

        def pick(logits: mx.array) -> mx.array:
            if all(s.sampler.greedy for s in streams):  # the argmax: no distribution to keep for acceptance
                return mx.argmax(logits, axis=-1)
            guesses = []
            for i, stream in enumerate(streams):
                drafts[i].append(stream.sampler.distribution(logits[i]))
                guesses.append(stream.sampler.draw_from(drafts[i][-1]))
            return mx.stack(guesses)

        guessed = self.runtime.draft(seqs, nexts, depth, pick)
        logits = self.runtime.verify(seqs, mx.concatenate([nexts[:, None], guessed], axis=1))
        fed, ends, follows, kept = [], [], [], []
        for i, (stream, guesses) in enumerate(zip(streams, guessed.tolist(), strict=True)):
            tokens, n = accept(stream.sampler, logits[i], guesses, drafts[i])
            stream.drafted, stream.accepted = stream.drafted + depth, stream.accepted + n
            kept.append(n)
            # what this pass fed: the next token, then the guesses accepted; each is handed out
            count, end = 0, None
            for j, token in enumerate([int(nexts[i].item())] + tokens[:-1]):
                count += 1
                if j == 0 and stream.launched is None:  # the prompt's last token
                    stream.tokens.append(token)
                    stream.fed += 1
                    continue
                sample = stream.launched if j == 0 else stream.sampler.report(logits[i, j - 1], mx.array(token))
                if end := self._hand_out(stream, sample):
                    break
            fed.append(count)
            ends.append(end)
            follows.append(tokens[-1])
        self.runtime.commit(seqs, fed)
        for i, stream in enumerate(streams):
            if ends[i]:
                self._finish(stream, *ends[i])
            else:  # the token after them is fed, and handed out, next step
                stream.launched = stream.sampler.report(logits[i, fed[i] - 1], mx.array(follows[i]))
                stream.next_input = mx.array([follows[i]])
        return kept

    def _draw(self, stream: _Stream, logits: mx.array, allowed: mx.array | None = None) -> None:
        sample = stream.sampler(logits, allowed)
        mx.async_eval(*(x for x in sample if x is not None))
        stream.launched, stream.next_input = sample, sample.token.reshape(1)

    def _hand_out(self, stream: _Stream, sample: Sample) -> tuple[str, bool] | None:
        """Give the caller a token already fed to the model; returns (reason, stopped by a stop string)
        when it ends the request."""
        token = sample.token.item()
        stream.tokens.append(token)
        stream.generated += 1
        if stream.generated == 1:
            stream.first_token = time.perf_counter()
        if stream.logprobs is not None:
            top = (
                ()
                if sample.top_ids is None
                else zip(sample.top_ids.tolist(), sample.top_logprobs.tolist(), strict=True)
            )
            stream.logprobs.append(TokenLogprob(token, sample.logprob.item(), tuple(top)))
        if stream.constrained and token not in self.runtime.tokenizer.eos_token_ids:
            stream.constraint.advance(token)
        elif stream.constraint is not None and token == self._think_close:
            stream.constrained = True  # the answer begins: from here it follows the format
        if token in self.runtime.tokenizer.eos_token_ids:
            return "stop", False
        events, stopped = stream.text.add(token)
        for event in events:
            stream.handle._events.put(event)
        if stopped:
            return "stop", True
        if stream.generated >= stream.max_new:
            return "length", False
        if stream.handle.cancelled:
            return "cancelled", False
        return None

    def _make_room(self, streams: list[_Stream]) -> list[_Stream]:
        """Put the youngest sequences back in the queue while the step would need more K/V than there is."""
        while len(streams) > 1 and self._used(growth=1) > self.runtime.kv_capacity:
            youngest = streams.pop()
            self._preempt(youngest)
        return streams

    def _preempt(self, stream: _Stream) -> None:
        pending = stream.first_input
        if stream.launched is not None:
            if end := self._hand_out(stream, stream.launched):
                self._finish(stream, *end)
                return
            pending = stream.tokens.pop()  # handed out, but not fed yet
        self.runtime.release(stream.seq)
        self._active.remove(stream)
        stream.seq, stream.launched, stream.decoding = None, None, False
        stream.feed, stream.first_input, stream.position = list(stream.tokens), pending, 0
        self._waiting.appendleft(stream)

    # --- the end of a request ----------------------------------------------------------------

    def _finish(self, stream: _Stream, reason: str, stopped: bool = False) -> None:
        handle, runtime = stream.handle, self.runtime
        self._timed = False  # what follows (the cache's states) is not a step's time
        if stream in self._active:
            self._active.remove(stream)
        events = stream.text.finish(stopped) if stream.text is not None else []
        for event in events:
            handle._events.put(event)
        done = handle.done = self._done(stream, reason)
        handle.tokens = list(stream.tokens)
        turn = None
        if stream.seq is not None and stream.generated and stream.request.next_turn is not None:
            try:
                turn = stream.request.next_turn(handle.tokens, done)
            except Exception as e:  # only a cache would be missed: the reply stands
                _log.warning("the next turn's tokens could not be rendered: %s", e)
        if turn and turn[: len(stream.tokens)] == stream.tokens:
            rest = turn[len(stream.tokens) :]
            for i in range(0, len(rest), runtime.prefill_chunk):
                runtime.prefill(stream.seq, rest[i : i + runtime.prefill_chunk])
            self._keep(handle, "turn", turn, stream.seq)
            turn = None
        if stream.seq is not None:
            runtime.release(stream.seq)
        if not self._active:
            runtime.settle()
        handle._events.put(done)
        if turn:
            self._warm.append(_Warm(turn, handle))
        else:
            handle.finished.set()

    def _done(self, stream: _Stream, reason: str) -> Done:
        end = time.perf_counter()
        first = stream.first_token if stream.generated else end
        text = stream.text
        calls = tuple(text.calls) if text else ()
        stats = Stats(
            prompt_tokens=stream.fed,
            cached_tokens=stream.cached,
            prompt_tps=stream.fed / max(first - stream.submitted, 1e-9),
            generated_tokens=stream.generated,
            generation_tps=(stream.generated - 1) / (end - first) if stream.generated > 1 else 0.0,
            ttft=first - stream.submitted,
            peak_memory=self.runtime.peak_memory(),
            finish_reason="tool_calls" if reason == "stop" and calls else reason,
            draft_tokens=stream.drafted,
            accepted_tokens=stream.accepted,
        )
        logprobs = None if stream.logprobs is None else tuple(stream.logprobs)
        if text is None:
            return Done("", "", (), stats, logprobs)
        return Done("".join(text.texts), "".join(text.thoughts), calls, stats, logprobs)
