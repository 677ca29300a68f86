"""Anthropic's API: /v1/messages, with text, thinking and tool_use content blocks, tool_result
input, and the streaming event sequence (message_start, content blocks, message_delta,
message_stop)."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import Any

from sse_starlette import EventSourceResponse
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..events import Done, TextDelta, ThinkingDelta, ToolCall
from ..llm import LLM
from .errors import APIError
from .generation import budget_setting, start_generation
from .pool import ModelPool
from .requests import field, json_body, sampling_overrides

_KINDS = {
    "invalid_request": "invalid_request_error",
    "authentication": "authentication_error",
    "not_found": "not_found_error",
    "too_large": "request_too_large",
    "overloaded": "overloaded_error",
    "insufficient_memory": "api_error",
    "server": "api_error",
}


def error_body(e: APIError) -> dict[str, Any]:
    return {"type": "error", "error": {"type": _KINDS[e.kind], "message": e.message}}


def _blocks(content: Any, where: str) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list) or not all(isinstance(b, dict) for b in content):
        raise APIError(400, f"{where}.content: expected a string or a list of content blocks")
    return content


def _result_text(content: Any, where: str) -> str:
    return "".join(b.get("text", "") for b in _blocks(content or "", where) if b.get("type") == "text")


def _messages(raw: Any, system: Any) -> list[dict[str, Any]]:
    """Anthropic messages as the chat template takes them: tool_result blocks become tool
    messages, thinking blocks the reply's reasoning, tool_use blocks its tool calls."""
    if not isinstance(raw, list) or not raw:
        raise APIError(400, "messages: expected a non-empty list of messages")
    messages: list[dict[str, Any]] = []
    if system:
        messages.append({"role": "system", "content": _result_text(system, "system")})
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ("user", "assistant"):
            raise APIError(400, f"{where}.role: expected user or assistant")
        text, thinking, calls, results = [], [], [], 0
        for block in _blocks(m.get("content"), where):
            kind = block.get("type")
            if kind == "text":
                text.append(field(block, "text", str, ""))
            elif kind == "thinking" and role == "assistant":
                thinking.append(field(block, "thinking", str, ""))
            elif kind == "redacted_thinking":
                continue
            elif kind == "tool_use" and role == "assistant":
                arguments = field(block, "input", dict, {})
                calls.append(
                    {"type": "function", "function": {"name": field(block, "name", str), "arguments": arguments}}
                )
            elif kind == "tool_result" and role == "user":
                messages.append({"role": "tool", "content": _result_text(block.get("content"), f"{where}.tool_result")})
                results += 1
            elif kind in ("image", "document"):
                raise APIError(400, f"{where}.content: this model does not take {kind} blocks")
            else:
                raise APIError(400, f"{where}.content: unexpected block type {kind!r} in a {role} message")
        if text or thinking or calls or not results:  # a message of tool results only is those tool messages
            message: dict[str, Any] = {"role": role, "content": "".join(text)}
            if thinking:
                message["reasoning_content"] = "".join(thinking)
            if calls:
                message["tool_calls"] = calls
            messages.append(message)
    return messages


def _tools(body: Mapping[str, Any]) -> list[dict[str, Any]] | None:
    tools = field(body, "tools", list)
    choice = field(body, "tool_choice", dict, {})
    if not tools or choice.get("type") == "none":
        return None
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or not isinstance(tool.get("name"), str):
            raise APIError(400, f"tools[{i}]: expected {{'name': ..., 'input_schema': {{...}}}}")
        spec = {
            "name": tool["name"],
            "description": tool.get("description", ""),
            "parameters": tool.get("input_schema"),
        }
        out.append({"type": "function", "function": spec})
    return out


def _stop_reason(done: Done) -> str:
    return {"length": "max_tokens", "tool_calls": "tool_use"}.get(done.finish_reason, "end_turn")


def _usage(done: Done) -> dict[str, Any]:
    s = done.stats
    return {
        "input_tokens": s.prompt_tokens,
        "output_tokens": s.generated_tokens,
        "cache_read_input_tokens": s.cached_tokens,
        "cache_creation_input_tokens": 0,
    }


def _tool_use(call: ToolCall) -> dict[str, Any]:
    return {"type": "tool_use", "id": f"toolu_{uuid.uuid4().hex[:24]}", "name": call.name, "input": call.arguments}


async def messages(request: Request) -> Response:
    body = await json_body(request)
    model = field(body, "model", str, "")
    max_tokens = field(body, "max_tokens", int)
    if max_tokens is None:
        raise APIError(400, "max_tokens: required")
    conversation = _messages(body.get("messages"), body.get("system"))
    overrides = sampling_overrides(
        {
            "max_tokens": max_tokens,
            "temperature": body.get("temperature"),
            "top_p": body.get("top_p"),
            "top_k": body.get("top_k"),
            "stop": body.get("stop_sequences"),
        }
    )
    tools = _tools(body)
    thinking = field(body, "thinking", dict)
    stream = field(body, "stream", bool, False)
    pool: ModelPool = request.app.state.pool

    def build(llm: LLM) -> tuple[Any, dict[str, Any]]:
        variables = budget_setting(llm.tokenizer.chat_template, thinking)
        return conversation, dict(tools=tools, template_vars=variables, **overrides)

    generation = await start_generation(request, model, pool.keep_alive, build)
    ident = f"msg_{uuid.uuid4().hex[:24]}"
    head = {"id": ident, "type": "message", "role": "assistant", "model": model}

    if not stream:
        done = await generation.reply()
        content: list[dict[str, Any]] = []
        if done.thinking:
            content.append({"type": "thinking", "thinking": done.thinking, "signature": ""})
        if done.text or not done.tool_calls:
            content.append({"type": "text", "text": done.text})
        content += [_tool_use(call) for call in done.tool_calls]
        reply = {**head, "content": content, "stop_reason": _stop_reason(done), "stop_sequence": None}
        return JSONResponse({**reply, "usage": _usage(done)})

    async def events() -> AsyncIterator[dict[str, str]]:
        def event(name: str, **data: Any) -> dict[str, str]:
            return {"event": name, "data": json.dumps({"type": name, **data}, ensure_ascii=False)}

        def delta(index: int, kind: str, **data: Any) -> dict[str, str]:
            return event("content_block_delta", index=index, delta={"type": kind, **data})

        start = {**head, "content": [], "stop_reason": None, "stop_sequence": None}
        yield event("message_start", message={**start, "usage": {"input_tokens": 0, "output_tokens": 0}})
        index, open_kind = -1, None  # the content block being written: "thinking" or "text"
        try:
            async for item in generation.events():
                kind = {ThinkingDelta: "thinking", TextDelta: "text"}.get(type(item))
                if open_kind is not None and kind != open_kind:
                    if open_kind == "thinking":
                        yield delta(index, "signature_delta", signature="")
                    yield event("content_block_stop", index=index)
                    open_kind = None
                if kind is not None and open_kind is None:
                    index, open_kind = index + 1, kind
                    yield event("content_block_start", index=index, content_block={"type": kind, kind: ""})
                if isinstance(item, ThinkingDelta):
                    yield delta(index, "thinking_delta", thinking=item.text)
                elif isinstance(item, TextDelta):
                    yield delta(index, "text_delta", text=item.text)
                elif isinstance(item, ToolCall):
                    index += 1
                    yield event("content_block_start", index=index, content_block={**_tool_use(item), "input": {}})
                    yield delta(index, "input_json_delta", partial_json=json.dumps(item.arguments, ensure_ascii=False))
                    yield event("content_block_stop", index=index)
                elif isinstance(item, Done):
                    stop = {"stop_reason": _stop_reason(item), "stop_sequence": None}
                    yield event("message_delta", delta=stop, usage=_usage(item))
                    yield event("message_stop")
        except APIError as e:
            yield {"event": "error", "data": json.dumps(error_body(e))}

    return EventSourceResponse(events(), ping=15)


routes = [Route("/v1/messages", messages, methods=["POST"])]
