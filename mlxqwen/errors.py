"""The errors users meet, each with a one-line message that names the file, field or parameter,
and `option`, which names a parameter in the user's own words."""

from __future__ import annotations

import shlex
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any


class ModelLoadError(ValueError):
    """A checkpoint cannot be loaded; the message names the file or field at fault."""


class ModelNotFoundError(ModelLoadError):
    """No model directory or file of that path, and no local model of that name (`mlxqwen list`)."""


class InsufficientMemoryError(ModelLoadError):
    """The model, at the context asked for, would not fit in this machine's memory."""


class ChatTemplateError(ModelLoadError):
    """The model's chat template fails: at load on a probe conversation, or on a conversation."""


class ContextLimitError(ValueError):
    """The conversation would not fit in the model's maximum context."""


class ConvertError(ValueError):
    """A conversion cannot go on; the message names the file, option or entry at fault."""


class QueueFullError(RuntimeError):
    """Too many requests are waiting for the model: try again later."""


_command_line: ContextVar[bool] = ContextVar("mlxqwen_command_line", default=False)


@contextmanager
def command_line_wording() -> Iterator[None]:
    """Within it, `option` names parameters as command-line flags (`mlxqwen.cli` runs in it)."""
    token = _command_line.set(True)
    try:
        yield
    finally:
        _command_line.reset(token)


def option(name: str, value: Any = True, literal: bool = False) -> str:
    """A parameter as the user writes it: `force=True`, `recipe='3bit'` from Python; `--force`,
    `--recipe 3bit` on the command line. literal: `value` is text written alike in both (a JSON
    object), quoted for the shell on the command line."""
    if _command_line.get():
        flag = "--" + name.replace("_", "-")
        return flag if value is True else f"{flag} {shlex.quote(value) if literal else value}"
    return f"{name}={value if literal else repr(value)}"
