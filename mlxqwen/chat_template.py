"""A checkpoint's chat template, rendered with Jinja2 in a sandbox with Hugging Face's semantics.

Same environment as transformers' `apply_chat_template`: an immutable sandbox with
`trim_blocks`/`lstrip_blocks`, loop controls, a `tojson` that keeps non-ASCII text and
does not escape HTML, `raise_exception`, `strftime_now`; messages lose their None-valued
keys, `reasoning`/`thinking` alias `reasoning_content`, and the special tokens
(`bos_token`, `eos_token`, ...) are template variables. Any other keyword
(`enable_thinking`, ...) is passed through to the template.

Thinking: Qwen3/3.5/3.6 templates turn it on or off (`enable_thinking`); Qwen3.8's also take
an effort (`reasoning_effort`: xhigh, medium, low; any other value raises). `thinking_levels`
finds the efforts a template accepts by rendering it with each known name, and
`thinking_vars` turns a `think` setting into the template's variables.

A template is code from the checkpoint: `check` renders a probe conversation when the model
loads, and any failure of a template (an escape from the sandbox included) is a one-line
`ChatTemplateError` that names the template's file."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import ChatTemplateError, ModelLoadError

Message = Mapping[str, Any]

_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")

# effort names a template may accept, least effort first (OpenAI's reasoning_effort values and Qwen3.8's)
EFFORT_LEVELS = ("none", "minimal", "low", "medium", "high", "xhigh", "max")
# What every chat template must render: a system prompt, a turn, a tool call and its result.
_PROBE = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the weather in Paris?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
    },
    {"role": "tool", "content": '{"celsius": 21}'},
    {"role": "assistant", "content": "It is 21 °C in Paris."},
    {"role": "user", "content": "Thanks!"},
]
_PROBE_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current temperature in a city.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _namespace(*args, **kwargs) -> jinja2.utils.Namespace:
    """`namespace()` that refuses underscore attributes, as transformers' sandbox does."""
    attrs = dict(*args, **kwargs)
    if any(str(name).startswith("_") for name in attrs):
        raise jinja2.exceptions.SecurityError("chat templates cannot set underscore attributes on a namespace")
    return jinja2.utils.Namespace(attrs)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(
        raise_exception=_raise_exception,
        strftime_now=lambda fmt: datetime.now().strftime(fmt),
        namespace=_namespace,
    )
    return env


def _plain_message(message: Message) -> dict[str, Any]:
    message = {k: v for k, v in dict(message).items() if v is not None}
    reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
    if reasoning is not None:
        message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
    return message


class ChatTemplate:
    """One Jinja chat template (with its named variants, e.g. `tool_use`) and the special tokens it sees."""

    def __init__(
        self,
        templates: str | Mapping[str, str],
        special_tokens: Mapping[str, str | None] | None = None,
        origin: str = "chat template",
    ):
        self.origin = origin  # where the template comes from, for messages: its file
        self.sources = {"default": templates} if isinstance(templates, str) else dict(templates)
        if "default" not in self.sources:
            raise ValueError(f"chat templates {sorted(self.sources)} have no 'default'")
        env = _environment()
        self.templates = {name: env.from_string(source) for name, source in self.sources.items()}
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}

    @classmethod
    def from_dir(
        cls, path: Path, tokenizer_config: Mapping[str, Any], special_tokens: Mapping[str, str | None]
    ) -> ChatTemplate | None:
        """`chat_template.jinja`, else `chat_template.json`, else `tokenizer_config.json`'s
        `chat_template` (a string or a list of named templates); None for a base model."""
        file, source = path / "chat_template.jinja", None
        if file.is_file():
            source = file.read_text()
        elif (path / "chat_template.json").is_file():
            file = path / "chat_template.json"
            try:
                source = json.loads(file.read_text())["chat_template"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ModelLoadError(f"{file}: expected a JSON object with a 'chat_template' string") from None
        else:
            file, source = path / "tokenizer_config.json", tokenizer_config.get("chat_template")
            if isinstance(source, list):
                source = {t["name"]: t["template"] for t in source}
        if source is None:
            return None
        try:
            template = cls(source, special_tokens, str(file))
        except (jinja2.TemplateSyntaxError, ValueError) as e:
            raise ModelLoadError(f"{file}: invalid chat template ({e})") from None
        template.check()
        return template

    def check(self) -> None:
        """Render a probe conversation (with a tool call) through every named template; raises
        ChatTemplateError if the template fails on it."""
        for name in self.templates:
            self._render(name, _PROBE, _PROBE_TOOLS, True, {}, "on a probe conversation ")

    def render(
        self,
        messages: Sequence[Message],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        **variables: Any,
    ) -> str:
        """The conversation as the model reads it. `variables` reach the template as they are
        (`enable_thinking=False`, `documents=[...]`, ...)."""
        name = "tool_use" if tools and "tool_use" in self.templates else "default"
        return self._render(name, messages, tools, add_generation_prompt, variables)

    def _render(
        self,
        name: str,
        messages: Sequence[Message],
        tools: Sequence[Mapping[str, Any]] | None,
        add_generation_prompt: bool,
        variables: Mapping[str, Any],
        what: str = "",
    ) -> str:
        try:
            return self.templates[name].render(
                **{
                    "documents": None,
                    **self.special_tokens,
                    **variables,
                    "messages": [_plain_message(m) for m in messages],
                    "tools": list(tools) if tools is not None else None,
                    "add_generation_prompt": add_generation_prompt,
                }
            )
        except Exception as e:  # the template is the checkpoint's code: whatever it raises
            reason = " ".join(str(e).split()) or type(e).__name__
            raise ChatTemplateError(f"{self.origin}: template error {what}({reason})") from e
        return self.templates[name].render(
            **{
                "documents": None,
                **self.special_tokens,
                **variables,
                "messages": [_plain_message(m) for m in messages],
                "tools": list(tools) if tools is not None else None,
                "add_generation_prompt": add_generation_prompt,
            }
        )

    @cached_property
    def thinking_levels(self) -> tuple[str, ...]:
        """The `reasoning_effort` values this template renders without error, least effort
        first (Qwen3.8: low, medium, xhigh); () for a template that takes only on/off."""
        if not any("reasoning_effort" in source for source in self.sources.values()):
            return ()
        probe = [{"role": "user", "content": "?"}]
        levels = []
        for level in EFFORT_LEVELS:
            try:
                self.render(probe, reasoning_effort=level)
            except ChatTemplateError:
                continue
            levels.append(level)
        return tuple(levels)

    def thinking_vars(self, think: bool | str | None) -> dict[str, Any]:
        """The template variables for `think`: None keeps the template's default, True/False turn
        thinking on/off, a level (one of `thinking_levels`) turns it on with that effort."""
        if think is None:
            return {}
        if isinstance(think, bool):
            return {"enable_thinking": think}
        if think in self.thinking_levels:
            return {"enable_thinking": True, "reasoning_effort": think}
        if not self.thinking_levels:
            raise ValueError(f"think={think!r}: this model has no thinking levels; think takes true or false")
        raise ValueError(f"think={think!r}: this model's thinking levels are {', '.join(self.thinking_levels)}")
