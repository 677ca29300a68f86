"""Where a conversion reads from: a local Hugging Face directory, or a Hub repo fetched into the
Hugging Face cache (only the files a conversion uses; honours HF_HOME and HF_HUB_OFFLINE)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from rich.progress import Progress

from .errors import ConvertError
from .progress import tqdm_class

# Weights, configs, tokenizer files and chat templates; never the PyTorch .bin duplicates.
SOURCE_PATTERNS = ["*.safetensors", "*.json", "*.jinja", "*.txt", "tokenizer.model", "*.tiktoken"]

_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


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
    if path.is_dir():
        if revision:
            raise ConvertError(f"{path}: --revision applies to Hugging Face Hub repos, not local directories")
        return Source(path.absolute())
    if path.exists():
        raise ConvertError(f"{path}: not a directory; pass a Hugging Face model directory or a Hub repo id")
    repo_id = str(source)
    if not _REPO_ID.match(repo_id):
        raise ConvertError(f"{source}: no such directory, and not a Hub repo id (like Qwen/Qwen3.6-27B)")
    return Source(*_download(repo_id, revision, progress))


def _download(repo_id: str, revision: str | None, progress: Progress | None) -> tuple[Path, str, str]:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    at = f" at revision {revision!r}" if revision else ""
    try:
        folder = snapshot_download(
            repo_id,
            revision=revision,
            allow_patterns=SOURCE_PATTERNS,
            tqdm_class=tqdm_class(progress) if progress is not None else None,
        )
    except LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the Hugging Face Hub cannot be reached"
        raise ConvertError(
            f"{repo_id}{at}: not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and {why}; "
            "download it while online, or pass a local directory"
        ) from None
    except GatedRepoError:
        raise ConvertError(
            f"{repo_id}: gated repo; accept its terms on huggingface.co and log in (hf auth login)"
        ) from None
    except RepositoryNotFoundError:
        raise ConvertError(
            f"{repo_id}: no local directory of that name, "
            "and no such repo on the Hugging Face Hub (or it is private: log in)"
        ) from None
    except RevisionNotFoundError:
        raise ConvertError(f"{repo_id}: revision {revision!r} not found") from None
    except HfHubHTTPError as e:
        raise ConvertError(f"{repo_id}: download failed ({e})") from None
    folder = Path(folder)
    return folder, repo_id, folder.name  # snapshot folders are named by commit
