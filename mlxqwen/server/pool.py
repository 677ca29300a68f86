"""The models a server holds in memory.

Clients name models as `mlxqwen list` shows them, or Ollama-style as `name:tag`, which is the
model `name-tag` (`name:latest` is `name`). A model loads on first use and stays while the
weights of all resident models fit in the memory budget together: to make room, the least
recently used idle models are unloaded. A model also leaves after its keep-alive (the time
it stays idle; negative or None: for ever, 0: right after its request). All bookkeeping runs
on the event loop; loading runs in a worker thread."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .. import memory
from ..display import format_size
from ..library import LocalModel, ModelNotFoundError, find_model, local_models
from ..llm import LLM
from .errors import APIError

log = logging.getLogger("mlxqwen.server")


@dataclass(eq=False)
class Resident:
    """A loaded model. `active`: generations running on it; `expires`: when an idle model
    leaves (monotonic seconds; None: never)."""

    model: LocalModel
    llm: LLM
    load_seconds: float
    keep_alive: float | None = None
    active: int = 0
    last_used: float = field(default_factory=time.monotonic)
    expires: float | None = None


def aliases(name: str) -> list[str]:
    """The names `name` may stand for: itself, and for `name:tag` `name-tag` (`name:latest`: `name`)."""
    if ":" not in name:
        return [name]
    base, tag = name.rsplit(":", 1)
    return [name, base] if tag == "latest" else [name, f"{base}-{tag}"]


class ModelPool:
    """models: the models served (None: every model `mlxqwen list` shows, looked up on each
    request). keep_alive: default seconds an idle model stays (None: for ever).
    load: path -> a loaded model (`mlxqwen.load` with the server's options)."""

    def __init__(
        self,
        models: Sequence[LocalModel] | None,
        *,
        keep_alive: float | None,
        load: Callable[[Path], LLM],
        budget: int | None = None,
    ):
        self.fixed = list(models) if models is not None else None
        self.keep_alive = keep_alive
        self.load = load
        self.budget = memory.memory_budget() if budget is None else budget
        self.resident: dict[str, Resident] = {}
        self._loading = asyncio.Lock()  # one load at a time: room is counted before each

    def models(self) -> list[LocalModel]:
        return list(self.fixed) if self.fixed is not None else local_models()

    def find(self, name: str) -> LocalModel:
        """The served model `name` stands for (as `mlxqwen list` shows it, or an alias); never a path."""
        if not isinstance(name, str) or not name:
            raise APIError(400, "model: name a model (see GET /api/tags or /v1/models)")
        models = self.models()
        for candidate in aliases(name):
            for model in models:
                if model.name == candidate or model.name.lower() == candidate.lower():
                    return model
        if self.fixed is None:
            try:
                find_model(name)  # for its "did you mean" hint
            except ModelNotFoundError as e:
                raise APIError(404, f"model {e}", "not_found") from None
        served = ", ".join(m.name for m in models)
        raise APIError(404, f"model {name!r} not found; this server has: {served}", "not_found")

    async def acquire(self, name: str, keep_alive: float | None) -> Resident:
        """The loaded model for `name`, loading it (and making room) if needed; counts a
        generation on it until `release`, after which it stays `keep_alive` seconds."""
        model = self.find(name)
        async with self._loading:
            resident = self.resident.get(model.name)
            if resident is None:
                resident = await self._load(model)
            resident.active += 1
            resident.last_used = time.monotonic()
            resident.keep_alive = keep_alive
            resident.expires = None
            return resident

    def release(self, resident: Resident) -> None:
        """A generation on `resident` ended: start its keep-alive once it is idle."""
        resident.active -= 1
        resident.last_used = time.monotonic()
        if resident.active == 0 and resident.keep_alive is not None and resident.keep_alive >= 0:
            resident.expires = resident.last_used + resident.keep_alive
            if resident.keep_alive == 0:
                self.reap()

    async def _load(self, model: LocalModel) -> Resident:
        if model.size_bytes > self.budget:
            fits = [m.name for m in self.models() if m.size_bytes <= self.budget]
            hint = f"models that fit: {', '.join(fits)}" if fits else "no local model fits"
            raise APIError(
                507,
                f"model {model.name} needs {format_size(model.size_bytes, binary=True)} for its weights, this "
                f"machine allows {format_size(self.budget, binary=True)}; {hint}",
                "insufficient_memory",
            )
        for idle in sorted(self.resident.values(), key=lambda r: r.last_used):
            if self._used() + model.size_bytes <= self.budget:
                break
            if idle.active == 0:
                self.unload(idle.model.name)
        if self._used() + model.size_bytes > self.budget:
            busy = ", ".join(self.resident)
            raise APIError(503, f"model {model.name} does not fit beside {busy}, which are busy; retry", "overloaded")
        start = time.perf_counter()
        llm = await asyncio.to_thread(self.load, model.path)  # InsufficientMemoryError: a 507 with what fits
        resident = Resident(model, llm, time.perf_counter() - start)
        self.resident[model.name] = resident
        log.info("loaded %s (%s) in %.1f s", model.name, llm.name, resident.load_seconds)
        return resident

    def _used(self) -> int:
        return sum(r.model.size_bytes for r in self.resident.values())

    def unload(self, name: str) -> bool:
        """Drop a model; it is freed once the generations still running on it have finished."""
        resident = self.resident.pop(name, None)
        if resident is None:
            return False
        # close waits for the requests still running on it, so not on the event loop
        threading.Thread(target=resident.llm.close, daemon=True, name=f"unload {name}").start()
        log.info("unloaded %s", name)
        return True

    def reap(self) -> None:
        """Unload the idle models whose keep-alive has passed."""
        now = time.monotonic()
        for name, resident in list(self.resident.items()):
            if resident.active == 0 and resident.expires is not None and resident.expires <= now:
                self.unload(name)

    async def reap_forever(self, every: float = 1.0) -> None:
        while True:
            await asyncio.sleep(every)
            self.reap()
