"""One rich progress display shared by download, conversion and evaluation (and a whole batch)."""

from __future__ import annotations

from huggingface_hub.utils import tqdm as hf_tqdm
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from mlxqwen.display import format_size


def make_progress(console: Console | None = None) -> Progress:
    """Tasks carry an `info` field (sizes, speed) next to the bar. Shown on a terminal only:
    redirected to a file, bars would be noise (and a stray blank line before the result)."""
    console = console or Console(stderr=True)
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not console.is_terminal,
    )


def add_task(progress: Progress, description: str, total: float | None) -> int:
    return progress.add_task(description, total=total, info="")


def bytes_done(done: float, total: float) -> str:
    """The `info` of a task that counts bytes: `1.2 GB/15.5 GB`."""
    return f"{format_size(done)}/{format_size(total)}"


def tqdm_class(progress: Progress) -> type[hf_tqdm]:
    """A tqdm class that draws into `progress`: huggingface_hub reports downloads through tqdm."""

    class RichTqdm(hf_tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["gui"] = True  # tqdm prints nothing itself; display() below draws
            kwargs["disable"] = bool(kwargs.get("disable", False))
            super().__init__(*args, **kwargs)
            if not self.disable:
                self._task = add_task(progress, self.desc or "download", self.total)

        def display(self, *_, **__):
            if hasattr(self, "_task"):
                info = bytes_done(self.n, self.total) if self.unit == "B" and self.total else ""
                progress.update(self._task, completed=self.n, total=self.total, description=self.desc, info=info)

        def clear(self, *_, **__):
            pass

        def close(self):
            if not self.disable:
                self.display()
            super().close()

    return RichTqdm
