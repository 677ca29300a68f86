"""The Hugging Face Hub: a repo's files fetched into the Hugging Face cache (honours HF_HOME
and HF_HUB_OFFLINE), only those asked for, with one-line errors. A repo already in the cache
is used offline; one that is not fails at once when the Hub cannot be reached."""

from __future__ import annotations

import re
from pathlib import Path

from .errors import ModelLoadError, option

REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def snapshot(repo_id: str, patterns: list[str], revision: str | None = None, tqdm_class=None) -> Path:
    """The folder (named by its commit) holding the files of `repo_id` that match `patterns`."""
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
        # one request to list the repo, then the files: unlike hf_hub_download, no retries
        # for half a minute when the network is down
        folder = snapshot_download(repo_id, revision=revision, allow_patterns=patterns, tqdm_class=tqdm_class)
    except LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the Hugging Face Hub cannot be reached"
        raise ModelLoadError(
            f"{repo_id}{at}: not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and {why}; connect and "
            "try again, or pass a local directory (mlxqwen chat works offline with the demo model)"
        ) from None
    except GatedRepoError:
        raise ModelLoadError(
            f"{repo_id}: gated repo; accept its terms on huggingface.co and log in (hf auth login)"
        ) from None
    except RepositoryNotFoundError:
        raise ModelLoadError(
            f"{repo_id}: no local directory of that name, and no such repo on the Hugging Face Hub "
            "(or it is private: log in with hf auth login)"
        ) from None
    except RevisionNotFoundError:
        raise ModelLoadError(f"{repo_id}: {option('revision', revision)} not found") from None
    except HfHubHTTPError as e:
        raise ModelLoadError(f"{repo_id}: download failed ({str(e).splitlines()[0]})") from None
    return Path(folder)
