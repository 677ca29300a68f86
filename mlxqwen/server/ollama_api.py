"""Ollama's API: /api/generate, /api/chat (NDJSON streams), /api/tags, /api/show, /api/ps,
/api/version, /api/pull, /api/delete."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import time
from collections.abc import AsyncIterator, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .. import __version__
from ..backends import apple_silicon
from ..chat_template import ChatTemplate
from ..checkpoint import read_json
from ..events import Done, TextDelta, ThinkingDelta, ToolCall
from ..library import LocalModel, remove_model
from ..llm import LLM
from ..structured import grammar
from .errors import APIError
from .generation import Generation, start_generation, think_setting
from .pool import ModelPool
from .requests import duration, field, json_body, sampling_overrides

NDJSON = "application/x-ndjson"
# Ollama's option names -> GenerationOptions fields
_OPTIONS = {
    "num_predict": "max_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "seed": "seed",
    "stop": "stop",
    "repeat_penalty": "repetition_penalty",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
}
_HUB_REPO = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


def error_body(e: APIError) -> dict[str, Any]:
    return {"error": e.message}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat().replace("+00:00", "Z")


# --- generation ---------------------------------------------------------------------


def _options(body: Mapping[str, Any]) -> tuple[dict[str, Any], int | None]:
    """GenerationOptions overrides from `options` and `format`; and num_ctx."""
    options = field(body, "options", dict, {})
    values = {_OPTIONS[k]: v for k, v in options.items() if k in _OPTIONS}
    if values.get("max_tokens") is not None and field(options, "num_predict", int) < 0:
        values["max_tokens"] = None  # -1: until the model stops, -2: until the context is full
    overrides = sampling_overrides(values, "options.")
    fmt = body.get("format")
    if fmt not in (None, ""):
        try:
            grammar(fmt)
        except ValueError as e:
            raise APIError(400, str(e)) from None
        overrides["format"] = fmt
    return overrides, field(options, "num_ctx", int)


def _messages(raw: Any) -> list[dict[str, Any]]:
    """Ollama messages as the chat template takes them."""
    if not isinstance(raw, list):
        raise APIError(400, "messages: expected a list of messages")
    messages = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "tool"):
            raise APIError(400, f"messages[{i}]: expected an object with a role of system, user, assistant or tool")
        if m.get("images"):
            raise APIError(400, f"messages[{i}].images: this model does not take images")
        message: dict[str, Any] = {"role": m["role"], "content": field(m, "content", str, "")}
        if m.get("thinking"):
            message["reasoning_content"] = field(m, "thinking", str)
        if m.get("tool_calls"):
            message["tool_calls"] = [_tool_call_in(call, f"messages[{i}].tool_calls") for call in m["tool_calls"]]
        if m.get("tool_name"):
            message["name"] = field(m, "tool_name", str)
        messages.append(message)
    return messages


def _tool_call_in(call: Any, where: str) -> dict[str, Any]:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise APIError(400, f"{where}: expected {{'function': {{'name': ..., 'arguments': {{...}}}}}}")
    arguments = function.get("arguments") or {}
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            raise APIError(400, f"{where}: arguments are not JSON") from None
    return {"type": "function", "function": {"name": function["name"], "arguments": arguments}}


def _build(body: Mapping[str, Any], prompt: Any, extra: dict[str, Any]):
    """The `build` of `start_generation`: the prompt and `llm.stream`'s arguments."""
    overrides, num_ctx = _options(body)
    think = field(body, "think", (bool, str))
    tools = field(body, "tools", list)

    def build(llm: LLM) -> tuple[Any, dict[str, Any]]:
        raw = extra.get("raw", False)
        kwargs = dict(extra, tools=tools, **overrides)
        if not raw:
            kwargs["template_vars"] = think_setting(llm.tokenizer.chat_template, think)
        if num_ctx:
            text = llm.prompt_text(prompt, system=extra.get("system"), tools=tools, raw=raw,
                                   template_vars=kwargs.get("template_vars"))  # fmt: skip
            n = len(llm.tokenizer.encode(text))
            if n >= num_ctx:
                raise APIError(400, f"the prompt is {n} tokens, over options.num_ctx={num_ctx}")
            kwargs["max_tokens"] = min(kwargs.get("max_tokens") or num_ctx, num_ctx - n)
        return prompt, kwargs

    return build


def _final(generation: Generation, request_start: float) -> dict[str, Any]:
    done = generation.done
    assert done is not None
    s = done.stats
    eval_seconds = (s.generated_tokens - 1) / s.generation_tps if s.generation_tps else 0.0
    return {
        "done": True,
        "done_reason": "length" if s.finish_reason == "length" else "stop",
        "total_duration": int((time.perf_counter() - request_start) * 1e9),
        "load_duration": int(generation.load_seconds * 1e9),
        "prompt_eval_count": s.prompt_tokens,
        "prompt_eval_duration": int(s.ttft * 1e9),
        "eval_count": s.generated_tokens,
        "eval_duration": int(eval_seconds * 1e9),
        "draft_count": s.draft_tokens,  # tokens the MTP head guessed, and of them kept
        "draft_accepted_count": s.accepted_tokens,
    }


def _tool_calls_out(calls: tuple[ToolCall, ...] | list[ToolCall]) -> list[dict[str, Any]]:
    return [{"function": {"name": c.name, "arguments": c.arguments}} for c in calls]


async def _respond(generation: Generation, stream: bool, model: str, start: float, chat: bool) -> Response:
    """One object, or an NDJSON stream of pieces and a closing object with the stats."""

    def piece(text: str = "", thinking: str = "", calls: list[ToolCall] | None = None) -> dict[str, Any]:
        if chat:
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if thinking:
                message["thinking"] = thinking
            if calls:
                message["tool_calls"] = _tool_calls_out(calls)
            return {"model": model, "created_at": _now(), "message": message, "done": False}
        out = {"model": model, "created_at": _now(), "response": text, "done": False}
        return {**out, "thinking": thinking} if thinking else out

    if not stream:
        done = await generation.reply()
        return JSONResponse({**piece(done.text, done.thinking, list(done.tool_calls)), **_final(generation, start)})

    async def lines() -> AsyncIterator[str]:
        try:
            async for event in generation.events():
                if isinstance(event, TextDelta):
                    yield json.dumps(piece(event.text)) + "\n"
                elif isinstance(event, ThinkingDelta):
                    yield json.dumps(piece(thinking=event.text)) + "\n"
                elif isinstance(event, ToolCall):
                    yield json.dumps(piece(calls=[event])) + "\n"
                elif isinstance(event, Done):
                    yield json.dumps({**piece(), **_final(generation, start)}) + "\n"
        except APIError as e:
            yield json.dumps(error_body(e)) + "\n"

    return StreamingResponse(lines(), media_type=NDJSON)


async def _load_or_unload(request: Request, body: dict[str, Any], name: str, key: str) -> Response:
    """A request without a prompt loads the model (keep_alive 0: unloads it), as Ollama's does."""
    pool: ModelPool = request.app.state.pool
    keep_alive = duration(body.get("keep_alive"), pool.keep_alive)
    model = pool.find(name)
    if keep_alive == 0:
        pool.unload(model.name)
        reason = "unload"
    else:
        pool.release(await pool.acquire(name, keep_alive))
        reason = "load"
    empty = {"role": "assistant", "content": ""} if key == "message" else ""
    return JSONResponse({"model": name, "created_at": _now(), key: empty, "done": True, "done_reason": reason})


async def generate(request: Request) -> Response:
    body = await json_body(request)
    start = time.perf_counter()
    name = field(body, "model", str, "")
    prompt = field(body, "prompt", str, "")
    if body.get("images"):
        raise APIError(400, "images: this model does not take images")
    if body.get("suffix"):
        raise APIError(400, "suffix: fill-in-the-middle is not supported")
    if not prompt:
        return await _load_or_unload(request, body, name, "response")
    extra = {"system": field(body, "system", str), "raw": field(body, "raw", bool, False)}
    pool: ModelPool = request.app.state.pool
    keep_alive = duration(body.get("keep_alive"), pool.keep_alive)
    generation = await start_generation(request, name, keep_alive, _build(body, prompt, extra))
    return await _respond(generation, field(body, "stream", bool, True), name, start, chat=False)


async def chat(request: Request) -> Response:
    body = await json_body(request)
    start = time.perf_counter()
    name = field(body, "model", str, "")
    messages = _messages(body.get("messages") or [])
    if not messages:
        return await _load_or_unload(request, body, name, "message")
    pool: ModelPool = request.app.state.pool
    keep_alive = duration(body.get("keep_alive"), pool.keep_alive)
    generation = await start_generation(request, name, keep_alive, _build(body, messages, {}))
    return await _respond(generation, field(body, "stream", bool, True), name, start, chat=True)


# --- models -------------------------------------------------------------------------


def _digest(model: LocalModel) -> str:
    return hashlib.sha256(f"{model.path}:{model.size_bytes}:{model.modified}".encode()).hexdigest()


def _gguf_fields(path: Path) -> dict[str, Any]:
    """The GGUF's metadata (tokenizer tables left out)."""
    import gguf

    reader = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith(("tokenizer.ggml", "GGUF."))}


def _metadata(model: LocalModel) -> tuple[dict[str, Any], str]:
    """model_info (Ollama's GGUF-style keys) and the chat template's source."""
    if model.format == "gguf":
        info = _gguf_fields(model.path)
        return info, str(info.pop("tokenizer.chat_template", ""))
    config = read_json(model.path / "config.json")
    text = config.get("text_config") or config
    arch = config.get("model_type", "qwen")
    info = {
        "general.architecture": arch,
        f"{arch}.context_length": text.get("max_position_embeddings"),
        f"{arch}.embedding_length": text.get("hidden_size"),
        f"{arch}.block_count": text.get("num_hidden_layers"),
    }
    template = ChatTemplate.from_dir(model.path, read_json(model.path / "tokenizer_config.json"), {})
    return info, template.sources["default"] if template else ""


def _details(model: LocalModel, info: Mapping[str, Any] | None = None) -> dict[str, Any]:
    family = str((info or {}).get("general.architecture", "qwen"))
    return {
        "parent_model": "",
        "format": model.format,
        "family": family,
        "families": [family],
        "parameter_size": "",
        "quantization_level": model.weights,
    }


def _entry(model: LocalModel) -> dict[str, Any]:
    return {
        "name": model.name,
        "model": model.name,
        "modified_at": _iso(model.modified),
        "size": model.size_bytes,
        "digest": _digest(model),
        "details": _details(model),
    }


async def tags(request: Request) -> Response:
    pool: ModelPool = request.app.state.pool
    models = await asyncio.to_thread(pool.models)
    return JSONResponse({"models": [_entry(m) for m in models]})


async def show(request: Request) -> Response:
    body = await json_body(request)
    pool: ModelPool = request.app.state.pool
    model = pool.find(field(body, "model", str) or field(body, "name", str, ""))
    info, template = await asyncio.to_thread(_metadata, model)
    capabilities = ["completion"]
    capabilities += ["tools"] if "tools" in template else []
    capabilities += ["thinking"] if "<think>" in template else []
    return JSONResponse(
        {
            "modelfile": f"FROM {model.path}\n",
            "parameters": "",
            "template": template,
            "details": _details(model, info),
            "model_info": info,
            "capabilities": capabilities,
            "modified_at": _iso(model.modified),
        }
    )


async def ps(request: Request) -> Response:
    pool: ModelPool = request.app.state.pool
    now_wall, now = time.time(), time.monotonic()
    models = []
    for resident in pool.resident.values():
        if resident.keep_alive is None:
            expires_at = "2318-01-01T00:00:00Z"  # for ever, as Ollama shows it
        elif resident.expires is not None:
            expires_at = _iso(now_wall + resident.expires - now)
        else:  # busy: its keep-alive starts when its requests end
            expires_at = _iso(now_wall + resident.keep_alive)
        model = resident.model
        entry = _entry(model)
        entry.update(expires_at=expires_at, size_vram=model.size_bytes if apple_silicon() else 0)
        models.append(entry)
    return JSONResponse({"models": models})


async def version(request: Request) -> Response:
    return JSONResponse({"version": __version__})


async def pull(request: Request) -> Response:
    """Download and convert a Hugging Face repo into the library (`mlxqwen pull`), progress streamed."""
    body = await json_body(request)
    source = field(body, "model", str) or field(body, "name", str, "")
    if not _HUB_REPO.fullmatch(source) or ".." in source or Path(source).expanduser().exists():
        raise APIError(400, f"model {source!r}: pull takes a Hugging Face repo id (owner/name), never a path")
    stream = field(body, "stream", bool, True)
    from rich.progress import Progress

    from ..pull import pull as pull_model

    progress = Progress(disable=True)  # keeps the tasks' counts, draws nothing
    task = asyncio.create_task(asyncio.to_thread(pull_model, source, progress=progress))

    async def lines() -> AsyncIterator[str]:
        yield json.dumps({"status": "pulling manifest"}) + "\n"
        seen: dict[Any, tuple] = {}
        while True:
            finished, _ = await asyncio.wait({task}, timeout=0.5)
            for t in progress.tasks:
                state = (t.description, t.completed, t.total)
                if seen.get(t.id) != state:
                    seen[t.id] = state
                    line: dict[str, Any] = {"status": t.description}
                    if t.total:
                        line.update(total=int(t.total), completed=int(t.completed))
                    yield json.dumps(line) + "\n"
            if finished:
                break
        try:
            pulled = task.result()
        except Exception as e:  # PullError, ConvertError, ModelLoadError: one line each
            yield json.dumps({"error": str(e)}) + "\n"
            return
        yield json.dumps({"status": f"{pulled.action}: {pulled.name}"}) + "\n"
        yield json.dumps({"status": "success"}) + "\n"

    if stream:
        return StreamingResponse(lines(), media_type=NDJSON)
    last: dict[str, Any] = {}
    async for line in lines():
        last = json.loads(line)
    if "error" in last:
        raise APIError(400, last["error"])
    return JSONResponse(last)


async def delete(request: Request) -> Response:
    """Remove a model from mlxqwen's library (never the Hugging Face cache or the demo model)."""
    body = await json_body(request)
    pool: ModelPool = request.app.state.pool
    model = pool.find(field(body, "model", str) or field(body, "name", str, ""))
    if model.where != "library":
        raise APIError(
            403, f"model {model.name}: only models in mlxqwen's library can be deleted (it is {model.where})"
        )
    pool.unload(model.name)
    await asyncio.to_thread(remove_model, model)
    return Response(status_code=200)


routes = [
    Route("/api/generate", generate, methods=["POST"]),
    Route("/api/chat", chat, methods=["POST"]),
    Route("/api/tags", tags, methods=["GET"]),
    Route("/api/show", show, methods=["POST"]),
    Route("/api/ps", ps, methods=["GET"]),
    Route("/api/version", version, methods=["GET"]),
    Route("/api/pull", pull, methods=["POST"]),
    Route("/api/delete", delete, methods=["DELETE"]),
]
