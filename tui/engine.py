"""One thread of its own for everything the model does.

MLX binds arrays to the stream of the thread that made them, so a model loaded, and a
chat's cache filled, in one thread cannot be used from another (Textual's thread workers
run in a pool, on any of its threads). All model work therefore goes through one
`EngineThread`; the UI awaits its results without blocking.

At exit the thread must be gone completely before the interpreter tears MLX down: a
thread that ran MLX code and ends while the process exits aborts it ("terminate called
without an active exception"). `close` waits for that."""

from __future__ import annotations

import asyncio
import os
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

T = TypeVar("T")


class EngineThread:
    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], Future] | None] = queue.SimpleQueue()
        # a daemon, so that quitting while a model loads does not wait for the load
        self._thread = threading.Thread(target=self._run, name="mlxqwen-engine", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            fn, future = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except BaseException as e:  # handed to whoever awaits the job
                future.set_exception(e)

    def submit(self, fn: Callable[[], T]) -> Future[T]:
        future: Future[T] = Future()
        self._jobs.put((fn, future))
        return future

    async def run(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the engine thread and await its result."""
        return await asyncio.wrap_future(self.submit(fn))

    def close(self, timeout: float = 2.0) -> bool:
        """Stop the thread once its current job ends; True when it is gone within `timeout`
        (False: it is still busy, and the process should leave with os._exit)."""
        self._jobs.put(None)
        self._thread.join(timeout)
        if self._thread.is_alive():
            return False
        # join() returns before the OS thread has run its thread-local destructors (MLX's
        # streams among them); on Linux /proc shows when it is really gone.
        task = f"/proc/self/task/{self._thread.native_id}"
        deadline = time.monotonic() + timeout
        while os.path.exists(task) and time.monotonic() < deadline:
            time.sleep(0.001)
        return not os.path.exists(task)
