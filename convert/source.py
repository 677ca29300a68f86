"""Where a conversion reads from: a local Hugging Face directory, a local model by its name
(`mlxqwen list`), or a Hub repo fetched into the Hugging Face cache (only the files a
conversion uses; see `mlxqwen.hub`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rich.progress import Progress

from mlxqwen.errors import ConvertError, ModelNotFoundError, option
from mlxqwen.hub import REPO_ID, snapshot
from mlxqwen.library import resolve_model

from .progress import tqdm_class

# Weights, configs, tokenizer files and chat templates; never the PyTorch .bin duplicates.
SOURCE_PATTERNS = ["*.safetensors", "*.json", "*.jinja", "*.txt", "tokenizer.model", "*.tiktoken"]


@dataclass
class Source:
    path: Path
    repo_id: str | None = None  # set for Hub sources
    revision: str | None = None  # the commit a Hub source was fetched at

    @property
    def name(self) -> str:
        return self.repo_id.split("/")[-1] if self.repo_id else self.path.name


def resolve_source(source: str | Path, revision: str | None = None, progress: Progress | None = None) -> Source:
    path = Path(source).expanduser()
    if not path.exists() and not REPO_ID.match(str(source)):
        try:
            path = resolve_model(str(source))
        except ModelNotFoundError:
            raise ConvertError(
                f"{source}: no such directory, no local model of that name (mlxqwen list), "
                "and not a Hub repo id (like Qwen/Qwen3.6-27B)"
            ) from None
    if path.is_dir():
        if revision:
            raise ConvertError(f"{path}: {option('revision', revision)} applies to Hub repos, not local directories")
        return Source(path.absolute())
    if path.exists():
        raise ConvertError(f"{path}: not a directory; pass a Hugging Face model directory or a Hub repo id")
    folder = snapshot(str(source), SOURCE_PATTERNS, revision, tqdm_class(progress) if progress is not None else None)
    return Source(folder, str(source), folder.name)  # snapshot folders are named by commit
