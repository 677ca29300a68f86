"""`convert()`: one source to one output, in the format `to` names.

An output format is a module listed in FORMATS that defines
- `OPTIONS`: option name -> argparse keyword arguments (flags of `mlxqwen convert`, keys of a
  batch entry; `default` is the default of both);
- `label(**options) -> str`: the recipe in a word or two, for summaries (`4bit`, `Q4_K_M`);
- `default_output(name, **options) -> str`: the output's name when none is given;
- `convert(source: Source, output: Path, *, force: bool, progress: Progress, **options) -> ConvertResult`,
  which writes `output` through `output.staged` (nothing half-written survives).
"""

from __future__ import annotations

import importlib
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from rich.progress import Progress

from .errors import ConvertError
from .output import check_output
from .progress import make_progress
from .quality import Quality
from .source import resolve_source

FORMATS: dict[str, str] = {
    "mlx": "mlxqwen.convert.mlx",
    "gguf": "mlxqwen.convert.gguf",
}


@dataclass
class ConvertResult:
    output: Path
    recipe: str  # what the summary shows: the recipe or quant type
    size_bytes: int
    bits_per_weight: float
    seconds: float
    quality: Quality | None = None


def output_format(to: str, where: str = "convert") -> ModuleType:
    if to not in FORMATS:
        raise ConvertError(f"{where}: unknown output format {to!r} (known: {', '.join(FORMATS)})")
    try:
        return importlib.import_module(FORMATS[to])
    except ImportError as e:  # a format's own dependencies (an optional extra) are missing
        raise ConvertError(f"{where}: output format {to!r} needs {e.name!r}, which is not installed") from None


def format_options(to: str, options: dict[str, Any], where: str = "convert") -> dict[str, Any]:
    """Check `options` against the format's OPTIONS and fill in the defaults."""
    known = output_format(to, where).OPTIONS
    resolved = {}
    for name, spec in known.items():
        value = options.get(name, spec.get("default", False if spec.get("action") == "store_true" else None))
        if value is not None and "choices" in spec and value not in spec["choices"]:
            choices = ", ".join(map(str, spec["choices"]))
            raise ConvertError(f"{where}: {name} = {value!r} is not one of {choices}")
        resolved[name] = value
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ConvertError(f"{where}: unknown option {unknown[0]!r} for --to {to} (options: {', '.join(known)})")
    return resolved


def label(to: str = "mlx", **options: Any) -> str:
    return output_format(to).label(**format_options(to, options))


def default_output(source: str | Path, to: str = "mlx", **options: Any) -> Path:
    return Path(output_format(to).default_output(Path(str(source)).name, **format_options(to, options)))


def convert(
    source: str | Path,
    output: str | Path | None = None,
    *,
    to: str = "mlx",
    revision: str | None = None,
    force: bool = False,
    progress: Progress | None = None,
    **options: Any,
) -> ConvertResult:
    """Convert a local Hugging Face directory or a Hub repo id into `output` (by default
    `NAME-RECIPE` in the working directory). Raises ConvertError / ModelLoadError with a
    one-line message on bad input; `output` is then left as it was."""
    fmt = output_format(to)
    options = format_options(to, options)
    output = Path(output).expanduser() if output else default_output(source, to, **options)
    check_output(output.absolute(), force)
    with make_progress() if progress is None else nullcontext(progress) as progress:
        resolved = resolve_source(source, revision, progress)
        return fmt.convert(resolved, output, force=force, progress=progress, **options)
