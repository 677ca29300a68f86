"""Writing an output so that nothing half-written ever looks finished.

Everything goes to a hidden `.NAME.partial-*` path next to the output and is renamed into
place at the very end; an error or Ctrl-C removes it. An existing output is replaced only
with `force`, and only once the new one is complete."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mlxqwen.display import format_size
from mlxqwen.errors import ConvertError, option


def check_output(output: Path, force: bool, source: Path | None = None) -> None:
    if source is not None:
        out, src = output.resolve(), source.resolve()
        if out == src or out in src.parents or src in out.parents:
            raise ConvertError(f"{output}: the output must not be, contain, or lie inside the source {source}")
    if output.exists() and not force:
        raise ConvertError(f"{output}: already exists; pass {option('force')} to replace it")


def check_free_space(directory: Path, needed: int) -> None:
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise ConvertError(
            f"{directory}: not enough free disk space ({format_size(needed)} needed, {format_size(free)} free)"
        )


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextmanager
def staged(output: Path, force: bool = False, source: Path | None = None) -> Iterator[Path]:
    """Yield a temporary path (not created: make a file or a directory there) that becomes `output`."""
    output = output.expanduser().absolute()
    check_output(output, force, source)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.partial-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        if output.exists():
            old = output.with_name(f".{output.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(output, old)
            os.replace(tmp, output)
            _remove(old)
        else:
            os.replace(tmp, output)
    except BaseException:
        _remove(tmp)
        raise
