"""`convert()`: one source to one output, in the format `to` names (`FORMATS`)."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any

from rich.progress import Progress

from mlxqwen.errors import ConvertError, ModelLoadError, option

from .format import ConvertResult, OutputFormat
from .gguf import GGUF
from .mlx import MLX
from .output import check_output
from .progress import make_progress
from .source import resolve_source

FORMATS: dict[str, OutputFormat] = {f.name: f for f in (MLX, GGUF)}


def output_format(to: str, where: str | None = None) -> OutputFormat:
    if to not in FORMATS:
        said = f"{where}: to = {to!r}" if where else option("to", to)
        raise ConvertError(f"{said}: unknown output format (known: {', '.join(FORMATS)})")
    return FORMATS[to]


def format_options(to: str, options: dict[str, Any], where: str | None = None) -> dict[str, Any]:
    """Every option of the format: `options` checked, the defaults filled in. `where` names the
    batch entry they come from (None: a call of `convert`, or the command line)."""
    known = output_format(to, where).options
    unknown = sorted(set(options) - set(known))
    if unknown:
        said = f"{where}: {unknown[0]}" if where else option(unknown[0], options[unknown[0]])
        raise ConvertError(f"{said}: not an option of the {to} format (its options: {', '.join(known)})")
    return {name: spec.check(name, options.get(name), where) for name, spec in known.items()}


def label(to: str = "mlx", **options: Any) -> str:
    return output_format(to).label(format_options(to, options))


def default_output(source: str | Path, to: str = "mlx", **options: Any) -> Path:
    return Path(output_format(to).default_output(Path(str(source)).name, format_options(to, options)))


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
    """Convert a local Hugging Face directory, a Hub repo id or a local model's name (`mlxqwen
    list`) into `output` (by default `NAME-RECIPE` in the working directory), in the format `to`
    names ("mlx" or "gguf") with that format's options. Raises ConvertError, with a one-line
    message, on bad input; `output` is then left as it was."""
    fmt = output_format(to)
    options = format_options(to, options)
    fmt.check(options)
    output = Path(output).expanduser() if output else default_output(source, to, **options)
    check_output(output.absolute(), force)
    try:
        with make_progress() if progress is None else nullcontext(progress) as progress:
            resolved = resolve_source(source, revision, progress)
            return fmt.convert(resolved, output, options, force=force, progress=progress)
    except ModelLoadError as e:  # the source cannot be read
        raise ConvertError(str(e)) from None
