"""What an output format of the converter is: its options and how it names, labels and writes
an output. The formats themselves (`mlx.MLX`, `gguf.GGUF`) are registered in `api.FORMATS`."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.progress import Progress

from mlxqwen.errors import ConvertError, option

from .quality import Quality
from .source import Source


@dataclass(frozen=True)
class Option:
    """An option of an output format: a flag of `mlxqwen convert` (`--group-size`), a keyword of
    `convert()` and a key of a batch entry (`group_size`)."""

    help: str
    default: Any = None
    type: type = str
    choices: tuple[Any, ...] | None = None
    switch: bool = False  # a flag without a value (its default: False)

    def argparse_kwargs(self) -> dict[str, Any]:
        if self.switch:
            return {"action": "store_true", "help": self.help}
        return {"type": self.type, "choices": self.choices, "help": self.help}

    def check(self, name: str, value: Any, where: str | None) -> Any:
        """`value`, or a one-line error in the caller's words: a batch entry (`where`) or Python."""
        if value is None:
            return self.default
        kind = bool if self.switch else self.type
        ok = isinstance(value, kind) or (kind is float and isinstance(value, int))
        if ok and self.choices is not None and value not in self.choices:
            ok = False
        if not ok:
            said = f"{where}: {name} = {value!r}" if where else option(name, value)
            expected = ", ".join(map(str, self.choices)) if self.choices else f"a {kind.__name__}"
            raise ConvertError(f"{said}: expected {'one of ' if self.choices else ''}{expected}")
        return kind(value)


@dataclass
class ConvertResult:
    output: Path
    recipe: str  # what the summary shows: the recipe or quant type
    size_bytes: int
    bits_per_weight: float
    seconds: float
    quality: Quality | None = None


class OutputFormat(ABC):
    """An output format. `options` holds every option (checked, defaults filled in) when a
    method is called."""

    name: str  # what `--to` (and a batch entry's `to`) says
    options: dict[str, Option]

    @abstractmethod
    def label(self, options: dict[str, Any]) -> str:
        """The recipe in a word or two, for summaries (`4bit`, `Q4_K_M`)."""

    def check(self, options: dict[str, Any]) -> None:  # noqa: B027 (most formats have nothing to check)
        """One-line errors for options that cannot work together, before anything is read."""

    @abstractmethod
    def default_output(self, name: str, options: dict[str, Any]) -> str:
        """The output's name when none is given, from the source's name."""

    @abstractmethod
    def convert(
        self, source: Source, output: Path, options: dict[str, Any], *, force: bool, progress: Progress | None
    ) -> ConvertResult:
        """Write `output` through `output.staged`, so that nothing half-written survives."""
