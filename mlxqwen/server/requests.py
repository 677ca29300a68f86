"""Reading request bodies: JSON objects, typed fields, sampling options, durations. Every bad
field is a 400 that names it."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from starlette.requests import Request

from ..sampling import GenerationOptions
from .errors import APIError

_NUMBERS = {"temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"}
_INTEGERS = {"top_k", "seed", "max_tokens", "logprobs"}
_DURATION = re.compile(r"(\d+(?:\.\d*)?)(ns|us|µs|ms|s|m|h)")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


async def json_body(request: Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.body() or b"{}")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON ({e})") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    return body


def field(body: Mapping[str, Any], name: str, types: type | tuple[type, ...], default: Any = None) -> Any:
    """body[name] when it has one of `types` (None or absent: `default`), else a 400 naming it."""
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in _tuple(types)):
        names = " or ".join(t.__name__ for t in _tuple(types))
        raise APIError(400, f"{name}: expected {names}, got {json.dumps(value)[:80]}")
    return value


def _tuple(types: type | tuple[type, ...]) -> tuple[type, ...]:
    return types if isinstance(types, tuple) else (types,)


def sampling_overrides(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """`GenerationOptions` overrides from a request's values (None: not set), type- and range-checked."""
    out: dict[str, Any] = {}
    for name, value in values.items():
        if value is None:
            continue
        label = prefix + name
        if name in _NUMBERS:
            out[name] = float(field({label: value}, label, (int, float)))
        elif name in _INTEGERS:
            out[name] = field({label: value}, label, int)
        elif name == "stop":
            stops = [value] if isinstance(value, str) else value
            if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
                raise APIError(400, f"{label}: expected a string or a list of strings")
            out[name] = tuple(stops)
        else:
            out[name] = value
    try:
        GenerationOptions(**out)
    except ValueError as e:
        raise APIError(400, f"{prefix}{e}") from None
    return out


def duration(value: Any, default: float | None, name: str = "keep_alive") -> float | None:
    """Seconds from an Ollama duration: a number of seconds ("30" too) or Go's form ("5m", "1h30m");
    negative means for ever (None), absent the default."""
    if value is None:
        return default
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and (text := value.strip().lstrip("-")):
        if re.fullmatch(r"\d+(\.\d*)?", text):
            seconds = float(text)
        elif "".join(m[0] for m in _DURATION.finditer(text)) == text:
            seconds = sum(float(n) * _UNIT_SECONDS[unit] for n, unit in _DURATION.findall(text))
        else:
            raise APIError(400, f"{name}: {value!r} is not a duration (e.g. 30s, 5m, 1h, 0, -1)")
        seconds = -seconds if value.strip().startswith("-") else seconds
    else:
        raise APIError(400, f"{name}: {value!r} is not a duration (e.g. 30s, 5m, 1h, 0, -1)")
    return None if seconds < 0 else seconds
