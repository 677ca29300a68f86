"""OpenAI's API: /v1/chat/completions, /v1/completions (server-sent events ending in [DONE]),
/v1/models."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import Any

from sse_starlette import EventSourceResponse
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..events import Done, TextDelta, ThinkingDelta, TokenLogprob, ToolCall
from ..llm import LLM
from ..structured import grammar
from ..tokenizer import Tokenizer
from .errors import APIError
from .generation import start_generation, think_setting
from .pool import ModelPool
from .requests import field, json_body, sampling_overrides

_KINDS = {
    "invalid_request": "invalid_request_error",
    "authentication": "authentication_error",
    "not_found": "not_found_error",
    "too_large": "invalid_request_error",
    "overloaded": "server_overloaded",
    "insufficient_memory": "insufficient_memory",
    "server": "server_error",
}


def error_body(e: APIError) -> dict[str, Any]:
    return {"error": {"message": e.message, "type": _KINDS[e.kind], "param": None, "code": None}}


def _finish_reason(done: Done) -> str:
    return {"cancelled": "stop"}.get(done.finish_reason, done.finish_reason)


def _usage(done: Done) -> dict[str, Any]:
    s = done.stats
    prompt = s.prompt_tokens + s.cached_tokens
    return {
        "prompt_tokens": prompt,
        "completion_tokens": s.generated_tokens,
        "total_tokens": prompt + s.generated_tokens,
        "prompt_tokens_details": {"cached_tokens": s.cached_tokens},
        # the MTP head's guesses: kept, and refused (OpenAI's names for predicted tokens)
        "completion_tokens_details": {
            "accepted_prediction_tokens": s.accepted_tokens,
            "rejected_prediction_tokens": s.draft_tokens - s.accepted_tokens,
        },
    }


# --- requests -------------------------------------------------------------------------


def _text(content: Any, where: str) -> str:
    """A message's content: a string, or a list of text parts."""
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise APIError(400, f"{where}.content: expected a string or a list of parts")
    texts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            texts.append(field(part, "text", str, ""))
        elif kind in ("image_url", "input_audio", "file"):
            raise APIError(400, f"{where}.content: this model does not take {kind} parts")
        else:
            raise APIError(400, f"{where}.content: unknown part {json.dumps(part)[:80]}")
    return "".join(texts)


def _messages(raw: Any) -> list[dict[str, Any]]:
    if not isinstance(raw, list) or not raw:
        raise APIError(400, "messages: expected a non-empty list of messages")
    messages = []
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ("system", "developer", "user", "assistant", "tool"):
            raise APIError(400, f"{where}.role: expected system, developer, user, assistant or tool")
        message: dict[str, Any] = {"role": "system" if role == "developer" else role}
        message["content"] = _text(m.get("content"), where)
        if m.get("reasoning_content"):
            message["reasoning_content"] = field(m, "reasoning_content", str)
        if m.get("tool_calls"):
            message["tool_calls"] = [_tool_call_in(c, f"{where}.tool_calls") for c in field(m, "tool_calls", list)]
        messages.append(message)
    return messages


def _tool_call_in(call: Any, where: str) -> dict[str, Any]:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise APIError(400, f"{where}: expected {{'type': 'function', 'function': {{'name': ..., 'arguments': ...}}}}")
    try:
        arguments = json.loads(function.get("arguments") or "{}")
    except (json.JSONDecodeError, TypeError):
        raise APIError(400, f"{where}: function.arguments must be a JSON string") from None
    return {"type": "function", "function": {"name": function["name"], "arguments": arguments}}


def _format(body: Mapping[str, Any]) -> str | dict[str, Any] | None:
    """response_format: text, json_object or json_schema -> GenerationOptions.format."""
    response_format = field(body, "response_format", dict)
    if response_format is None or response_format.get("type") == "text":
        return None
    if response_format.get("type") == "json_object":
        return "json"
    if response_format.get("type") == "json_schema":
        schema = (response_format.get("json_schema") or {}).get("schema")
        if not isinstance(schema, dict):
            raise APIError(400, "response_format.json_schema.schema: expected a JSON schema object")
        try:
            grammar(schema)
        except ValueError as e:
            raise APIError(400, f"response_format: {e}") from None
        return schema
    raise APIError(400, "response_format.type: expected text, json_object or json_schema")


def _overrides(body: Mapping[str, Any]) -> dict[str, Any]:
    if field(body, "n", int, 1) != 1:
        raise APIError(400, "n: only one choice per request is supported (n=1)")
    logprobs = field(body, "logprobs", (bool, int), False)
    top = field(body, "top_logprobs", int)
    overrides = sampling_overrides(
        {
            "temperature": body.get("temperature"),
            "top_p": body.get("top_p"),
            "top_k": body.get("top_k"),
            "min_p": body.get("min_p"),
            "repetition_penalty": body.get("repetition_penalty"),
            "presence_penalty": body.get("presence_penalty"),
            "frequency_penalty": body.get("frequency_penalty"),
            "seed": body.get("seed"),
            "stop": body.get("stop"),
            "max_tokens": body.get("max_completion_tokens", body.get("max_tokens")),
            # chat: logprobs is a flag and top_logprobs the count; completions: logprobs is the count
            "logprobs": (top or 0) if logprobs is True else (logprobs or None),
        }
    )
    fmt = _format(body)
    return {**overrides, "format": fmt} if fmt is not None else overrides


def _tools(body: Mapping[str, Any]) -> list[dict[str, Any]] | None:
    tools = field(body, "tools", list)
    return None if body.get("tool_choice") == "none" else tools


# --- responses ------------------------------------------------------------------------


def _logprob_entry(tokenizer: Tokenizer, token: int, logprob: float) -> dict[str, Any]:
    text = tokenizer.decode([token])
    return {"token": text, "logprob": logprob, "bytes": list(text.encode())}


def _chat_logprobs(tokenizer: Tokenizer, logprobs: tuple[TokenLogprob, ...] | None) -> dict[str, Any] | None:
    if logprobs is None:
        return None
    return {
        "content": [
            {
                **_logprob_entry(tokenizer, p.token, p.logprob),
                "top_logprobs": [_logprob_entry(tokenizer, t, lp) for t, lp in p.top],
            }
            for p in logprobs
        ]
    }


def _tool_call_out(call: ToolCall, index: int) -> dict[str, Any]:
    return {
        "index": index,
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {"name": call.name, "arguments": json.dumps(call.arguments, ensure_ascii=False)},
    }


def _sse(chunks: AsyncIterator[dict[str, Any]]) -> EventSourceResponse:
    async def events() -> AsyncIterator[dict[str, str]]:
        try:
            async for chunk in chunks:
                yield {"data": json.dumps(chunk, ensure_ascii=False)}
        except APIError as e:
            yield {"data": json.dumps(error_body(e))}
        yield {"data": "[DONE]"}

    return EventSourceResponse(events(), ping=15)


async def chat_completions(request: Request) -> Response:
    body = await json_body(request)
    model = field(body, "model", str, "")
    messages = _messages(body.get("messages"))
    overrides = _overrides(body)
    tools = _tools(body)
    effort = field(body, "reasoning_effort", str)
    stream = field(body, "stream", bool, False)
    include_usage = bool((field(body, "stream_options", dict) or {}).get("include_usage"))
    pool: ModelPool = request.app.state.pool

    def build(llm: LLM) -> tuple[Any, dict[str, Any]]:
        think = think_setting(llm.tokenizer.chat_template, effort)
        return messages, dict(tools=tools, template_vars=think, **overrides)

    generation = await start_generation(request, model, pool.keep_alive, build)
    tokenizer = generation.resident.llm.tokenizer
    ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    head = {"id": ident, "object": "chat.completion", "created": created, "model": model}

    if not stream:
        done = await generation.reply()
        message: dict[str, Any] = {"role": "assistant", "content": done.text}
        if done.thinking:
            message["reasoning_content"] = done.thinking
        if done.tool_calls:
            message["tool_calls"] = [_tool_call_out(c, i) for i, c in enumerate(done.tool_calls)]
        choice = {
            "index": 0,
            "message": message,
            "logprobs": _chat_logprobs(tokenizer, done.logprobs),
            "finish_reason": _finish_reason(done),
        }
        return JSONResponse({**head, "choices": [choice], "usage": _usage(done)})

    chunk_head = {**head, "object": "chat.completion.chunk"}

    def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> dict[str, Any]:
        return {**chunk_head, "choices": [{"index": 0, "delta": delta, "finish_reason": finish, **extra}]}

    async def chunks() -> AsyncIterator[dict[str, Any]]:
        yield chunk({"role": "assistant", "content": ""})
        calls = 0
        async for event in generation.events():
            if isinstance(event, TextDelta):
                yield chunk({"content": event.text})
            elif isinstance(event, ThinkingDelta):
                yield chunk({"reasoning_content": event.text})
            elif isinstance(event, ToolCall):
                yield chunk({"tool_calls": [_tool_call_out(event, calls)]})
                calls += 1
            elif isinstance(event, Done):
                yield chunk({}, _finish_reason(event), logprobs=_chat_logprobs(tokenizer, event.logprobs))
                if include_usage:
                    yield {**chunk_head, "choices": [], "usage": _usage(event)}

    return _sse(chunks())


async def completions(request: Request) -> Response:
    """Plain text completion: the prompt is sent as is, without the chat template."""
    body = await json_body(request)
    model = field(body, "model", str, "")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise APIError(400, "prompt: expected a non-empty string (one prompt per request)")
    for unsupported in ("suffix", "echo", "best_of"):
        if body.get(unsupported) not in (None, False, 1, ""):
            raise APIError(400, f"{unsupported}: not supported")
    overrides = _overrides(body)
    stream = field(body, "stream", bool, False)
    include_usage = bool((field(body, "stream_options", dict) or {}).get("include_usage"))
    pool: ModelPool = request.app.state.pool
    generation = await start_generation(
        request, model, pool.keep_alive, lambda llm: (prompt, dict(raw=True, **overrides))
    )
    tokenizer = generation.resident.llm.tokenizer
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()), "model": model}

    def logprobs_of(done: Done) -> dict[str, Any] | None:
        if done.logprobs is None:
            return None
        return {
            "tokens": [tokenizer.decode([p.token]) for p in done.logprobs],
            "token_logprobs": [p.logprob for p in done.logprobs],
            "top_logprobs": [{tokenizer.decode([t]): lp for t, lp in p.top} for p in done.logprobs],
        }

    if not stream:
        done = await generation.reply()
        text = done.thinking + done.text  # a raw prompt: the model's whole text
        choice = {"index": 0, "text": text, "logprobs": logprobs_of(done), "finish_reason": _finish_reason(done)}
        return JSONResponse({**head, "choices": [choice], "usage": _usage(done)})

    def chunk(text: str, finish: str | None = None, logprobs: Any = None) -> dict[str, Any]:
        return {**head, "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}]}

    async def chunks() -> AsyncIterator[dict[str, Any]]:
        async for event in generation.events():
            if isinstance(event, (TextDelta, ThinkingDelta)):
                yield chunk(event.text)
            elif isinstance(event, Done):
                yield chunk("", _finish_reason(event), logprobs_of(event))
                if include_usage:
                    yield {**head, "choices": [], "usage": _usage(event)}

    return _sse(chunks())


async def models(request: Request) -> Response:
    pool: ModelPool = request.app.state.pool
    found = await asyncio.to_thread(pool.models)
    data = [{"id": m.name, "object": "model", "created": int(m.modified), "owned_by": "mlxqwen"} for m in found]
    return JSONResponse({"object": "list", "data": data})


async def model(request: Request) -> Response:
    pool: ModelPool = request.app.state.pool
    m = pool.find(request.path_params["name"])
    return JSONResponse({"id": m.name, "object": "model", "created": int(m.modified), "owned_by": "mlxqwen"})


routes = [
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    Route("/v1/completions", completions, methods=["POST"]),
    Route("/v1/models", models, methods=["GET"]),
    Route("/v1/models/{name:path}", model, methods=["GET"]),
]
