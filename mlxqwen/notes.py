"""Notes for the user: advice such as "this model would run faster on llama.cpp".

The library logs them as warnings to the `mlxqwen` logger, which prints nothing unless the
application configures logging (the library convention). The command line and the chat app
`collect` them around a load and show each one once on this machine (`first_time`): advice
read once is known; repeated on every run it is noise."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from .library import data_dir

logger = logging.getLogger("mlxqwen")  # has a NullHandler (mlxqwen/__init__.py)


class _Collector(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.notes: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.notes.append(record.getMessage())


@contextmanager
def collect() -> Iterator[list[str]]:
    """The notes logged within the block (the list fills as they come)."""
    collector = _Collector()
    logger.addHandler(collector)
    try:
        yield collector.notes
    finally:
        logger.removeHandler(collector)


def first_time(note: str) -> bool:
    """True the first time `note` is asked about on this machine; it is remembered in the user
    data folder (`notes.json`). Where that folder cannot be written, every time is the first."""
    file = data_dir() / "notes.json"
    key = hashlib.sha256(note.encode()).hexdigest()[:16]
    try:
        said = json.loads(file.read_text()) if file.is_file() else []
    except (OSError, ValueError):
        said = []
    if key in said:
        return False
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_name(f".{file.name}.{uuid.uuid4().hex[:8]}")
        tmp.write_text(json.dumps([*said, key]))
        os.replace(tmp, file)
    except OSError:
        pass
    return True
