"""Model output as typed events: thinking, answer text and tool calls.

Text arrives in arbitrary pieces (a tag may be split across tokens), so the parser holds
back any tail that could be the start of a tag. Thinking is what lies between `<think>`
and `</think>`; the template may open `<think>` in the prompt, so the parser can start
inside it. Tool calls come in two Qwen formats, both inside `<tool_call>...</tool_call>`:
JSON `{"name": ..., "arguments": {...}}` (Qwen2.5, Qwen3) and XML
`<function=NAME><parameter=P>value</parameter></function>` (Qwen3.5/3.6, Qwen3-Coder).
A call that cannot be parsed comes back as text exactly as the model wrote it (the whitespace
around it included), never as an exception."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from .events import TextDelta, ThinkingDelta, ToolCall

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"


_FUNCTION = re.compile(r"<function=([^>\n]+)>(.*)</function>", re.S)
_PARAMETER = re.compile(r"<parameter=([^>\n]+)>\n?(.*?)\n?</parameter>", re.S)


def _parameter_types(tools: Sequence[Mapping[str, Any]] | None, name: str) -> dict[str, Any]:
    for tool in tools or ():
        spec = tool.get("function", tool)
        if spec.get("name") == name:
            return {p: s.get("type") for p, s in ((spec.get("parameters") or {}).get("properties") or {}).items()}
    return {}


def _xml_value(value: str, schema_type: Any) -> Any:
    """XML parameters are text; the tool's JSON schema says when they hold another JSON type."""
    types = schema_type if isinstance(schema_type, list) else [schema_type]
    if schema_type is None or "string" in types:
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def parse_tool_call(body: str, tools: Sequence[Mapping[str, Any]] | None = None) -> ToolCall | None:
    """The call written between `<tool_call>` and `</tool_call>`, or None when it is malformed."""
    body = body.strip()
    if body.startswith("<function="):
        m = _FUNCTION.fullmatch(body)
        if not m or _PARAMETER.sub("", m[2]).strip():
            return None
        name = m[1].strip()
        types = _parameter_types(tools, name)
        return ToolCall(name, {p.strip(): _xml_value(v, types.get(p.strip())) for p, v in _PARAMETER.findall(m[2])})
    try:
        call = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None
    args = call.get("arguments", call.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    return ToolCall(call["name"], args) if isinstance(args, dict) else None


def held_back(text: str, tags: Sequence[str]) -> int:
    """Length of the longest tail of `text` that is the start of one of `tags`."""
    longest = 0
    for tag in tags:
        for n in range(min(len(tag) - 1, len(text)), longest, -1):
            if text.endswith(tag[:n]):
                longest = n
                break
    return longest


def opens_thinking(prompt: str) -> bool:
    """Whether a rendered prompt ends inside a `<think>` block (the template opened it)."""
    return prompt.rfind(THINK_OPEN) > prompt.rfind(THINK_CLOSE)


class _Trimmed:
    """One segment (thinking, or answer text) streamed without leading or trailing whitespace:
    whitespace at the end is held until more text follows it."""

    def __init__(self) -> None:
        self.started = False
        self.pending = ""

    def push(self, text: str) -> str:
        if not self.started:
            text = text.lstrip()
            self.started = bool(text)
        text = self.pending + text
        body = text.rstrip()
        self.pending = text[len(body) :]
        return body


ParsedEvent = ThinkingDelta | TextDelta | ToolCall


class OutputParser:
    """Feed decoded text pieces; get thinking, answer and tool-call events back.

    thinking: the prompt left a `<think>` block open, so output starts as reasoning.
    tools: the tool schemas given to the template; they type XML parameter values."""

    def __init__(self, thinking: bool = False, tools: Sequence[Mapping[str, Any]] | None = None):
        self.state = "think" if thinking else "text"
        self.tools = tools
        self.buffer = ""
        self.segment = _Trimmed()
        self.answered = False  # once the answer has begun, "<think>" in it is plain text

    def _emit(self, text: str, events: list[ParsedEvent]) -> None:
        text = self.segment.push(text)
        if text:
            events.append(ThinkingDelta(text) if self.state == "think" else TextDelta(text))

    def _switch(self, state: str) -> None:
        self.state, self.segment = state, _Trimmed()

    def feed(self, text: str) -> list[ParsedEvent]:
        self.buffer += text
        events: list[ParsedEvent] = []
        while True:
            if self.state == "call":
                end = self.buffer.find(CALL_CLOSE)
                if end < 0:
                    return events
                body, self.buffer = self.buffer[:end], self.buffer[end + len(CALL_CLOSE) :]
                call = parse_tool_call(body, self.tools)
                self.answered = True
                if call is None:  # text after all: the segment it interrupted goes on, spaces and all
                    self.state = "text"
                    self._emit(CALL_OPEN + body + CALL_CLOSE, events)
                else:
                    events.append(call)
                    self._switch("text")
                continue
            if self.state == "text" and not self.answered:  # thinking may open only before any answer
                head = self.buffer.lstrip()
                if head.startswith(THINK_OPEN):
                    self.buffer = head[len(THINK_OPEN) :]
                    self._switch("think")
                    continue
                if not head or THINK_OPEN.startswith(head):
                    return events
                self.answered = True
            tag = THINK_CLOSE if self.state == "think" else CALL_OPEN
            i = self.buffer.find(tag)
            if i < 0:
                keep = len(self.buffer) - held_back(self.buffer, [tag])
                self._emit(self.buffer[:keep], events)
                self.buffer = self.buffer[keep:]
                return events
            self._emit(self.buffer[:i], events)
            self.buffer = self.buffer[i + len(tag) :]
            if tag == THINK_CLOSE:
                self._switch("text")
            else:  # the text segment waits, with its trailing spaces, in case the call is malformed
                self.state = "call"

    def finish(self) -> list[ParsedEvent]:
        """End of output: what is held back comes out; an unterminated tool call comes back as text."""
        events: list[ParsedEvent] = []
        if self.state == "call":
            events.append(TextDelta(self.segment.pending + CALL_OPEN + self.buffer))
        else:
            self._emit(self.buffer, events)
        self.buffer = ""
        return events
