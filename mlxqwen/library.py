"""The models on this machine: models converted into mlxqwen's library (`mlxqwen pull`),
Qwen checkpoints in the Hugging Face cache, and the demo model that ships with mlxqwen.

The library is the `models` folder of mlxqwen's user data folder (`$MLXQWEN_DATA_DIR`, else
`~/Library/Application Support/mlxqwen` on a Mac, `~/.local/share/mlxqwen` on Linux): model
directories (MLX, mlx-lm's format) and GGUF files."""

from __future__ import annotations

import difflib
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import platformdirs

from . import demo
from .checkpoint import gguf_file, read_config, shard_files
from .config import ModelConfig, parse_config
from .errors import ModelLoadError, ModelNotFoundError

DATA_DIR_ENV = "MLXQWEN_DATA_DIR"
FORMAT_LABELS = {"mlx": "MLX", "gguf": "GGUF", "mlx+gguf": "MLX+GGUF"}  # LocalModel.format, as shown

_GGUF_TYPE = re.compile(r"(?i)(?:^|[-_.])((?:I?Q\d(?:_[A-Z0-9]+)*)|BF16|F16|F32)(?=\.gguf$|[-_.])")


@dataclass(frozen=True)
class LocalModel:
    name: str  # what `mlxqwen chat NAME` and `mlxqwen rm NAME` take
    path: Path  # a model directory, or a .gguf file
    format: str  # "mlx" (a directory), "gguf" (a file for llama.cpp), "mlx+gguf" (a directory holding a GGUF too)
    where: str  # "library", "hf-cache", "demo", or "path" (named by its path)
    size_bytes: int
    modified: float  # seconds since the epoch
    weights: str  # "4-bit", "bf16", "Q4_K_M", ...
    repo_id: str | None = None  # Hugging Face cache entries


def data_dir() -> Path:
    """mlxqwen's user data folder (platformdirs), or $MLXQWEN_DATA_DIR."""
    if os.environ.get(DATA_DIR_ENV):
        return Path(os.environ[DATA_DIR_ENV]).expanduser()
    return Path(platformdirs.user_data_dir("mlxqwen", appauthor=False))


def models_dir() -> Path:
    """Where `mlxqwen pull` puts converted models."""
    return data_dir() / "models"


def disk_size(path: Path) -> int:
    """Bytes a file, or a directory's files, take."""
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _qwen_config(path: Path) -> ModelConfig | None:
    """The config of a Qwen checkpoint directory whose weights are all there, else None."""
    try:
        config = parse_config(read_config(path), str(path / "config.json"))
        shard_files(path)
    except (OSError, ValueError):
        return None
    return config


def _weights(config: ModelConfig) -> str:
    q = config.quantization or {}
    if q.get("bits"):
        mixed = any(isinstance(v, dict) and v.get("bits") != q["bits"] for v in q.values())
        return f"{q['bits']}-bit" + (" mixed" if mixed else "")
    if q.get("quant_method") == "fp8":
        return "fp8"
    dtype = config.dtype or "?"
    return {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}.get(dtype, dtype)


def _directory_format(path: Path) -> str:
    try:
        return "mlx+gguf" if gguf_file(path) else "mlx"
    except ModelLoadError:  # several GGUF models: loading asks which
        return "mlx+gguf"


def _gguf_type(path: Path) -> str:
    match = _GGUF_TYPE.search(path.name)
    return match.group(1).upper() if match else "GGUF"


def _library_models(root: Path) -> list[LocalModel]:
    if not root.is_dir():
        return []
    models = []
    for path in sorted(root.iterdir()):
        if path.name.startswith("."):  # conversions in progress
            continue
        if path.is_file() and path.suffix == ".gguf":
            entry = ("gguf", _gguf_type(path))
        elif path.is_dir() and (config := _qwen_config(path)) is not None:
            entry = (_directory_format(path), _weights(config))
        else:
            continue
        models.append(LocalModel(path.name, path, entry[0], "library", disk_size(path), path.stat().st_mtime, entry[1]))
    return models


def _hf_cache_models() -> list[LocalModel]:
    from huggingface_hub import constants, scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        cache = scan_cache_dir(constants.HF_HUB_CACHE)
    except (CacheNotFound, OSError):
        return []
    models = []
    for repo in cache.repos:
        if repo.repo_type != "model":
            continue
        main = [r for r in repo.revisions if "main" in r.refs]
        revision = (main or sorted(repo.revisions, key=lambda r: r.last_modified))[-1:]
        if not revision or (config := _qwen_config(revision[0].snapshot_path)) is None:
            continue
        rev, weights = revision[0], _weights(config)
        size, modified, path = repo.size_on_disk, rev.last_modified, rev.snapshot_path
        models.append(
            LocalModel(repo.repo_id, path, _directory_format(path), "hf-cache", size, modified, weights, repo.repo_id)
        )
    return models


def _demo_models() -> list[LocalModel]:
    try:
        path = demo.model_path()
    except FileNotFoundError:
        return []
    modified = path.stat().st_mtime
    return [LocalModel(demo.NAME, path, _directory_format(path), "demo", disk_size(path), modified, "4-bit")]


def local_models() -> list[LocalModel]:
    """Every model on this machine: the library's, the Hugging Face cache's Qwen checkpoints,
    then the demo model."""
    return _library_models(models_dir()) + _hf_cache_models() + _demo_models()


def default_model() -> LocalModel:
    """The model to open when none is named: the newest in the library, else the newest Qwen
    checkpoint in the Hugging Face cache, else the demo model."""
    models = local_models()
    for where in ("library", "hf-cache", "demo"):
        found = [m for m in models if m.where == where]
        if found:
            return max(found, key=lambda m: m.modified)
    raise ModelNotFoundError("no model on this machine; run mlxqwen pull Qwen/Qwen3.6-27B")


def _not_found(name: str, models: list[LocalModel], what: str) -> ModelNotFoundError:
    close = difflib.get_close_matches(name, [m.name for m in models], n=3)
    hint = f"did you mean {', '.join(close)}?" if close else "see mlxqwen list"
    return ModelNotFoundError(f"{name}: {what}; {hint}")


def find_model(name: str) -> LocalModel:
    """The local model called `name` (as `mlxqwen list` shows it)."""
    models = local_models()
    for model in models:
        if model.name == name:
            return model
    raise _not_found(name, models, "no such local model")


def resolve_model(name_or_path: str | Path) -> Path:
    """What every command and `mlxqwen.load` take: a model directory or GGUF file, else the name
    of a local model as `mlxqwen list` shows it (its directory or file)."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    models = local_models()
    for model in models:
        if model.name == str(name_or_path):
            return model.path
    raise _not_found(str(name_or_path), models, "no such model directory or GGUF file, nor a local model name")


def model_name(path: Path) -> str:
    """The name `mlxqwen list` gives the model at `path` (a library or cache model, the demo),
    else the path's own name."""
    resolved = path.resolve()
    return next((m.name for m in local_models() if m.path.resolve() == resolved), path.name)


def check_removable(model: LocalModel) -> None:
    """Raise for a model `remove_model` must keep: the demo model ships with mlxqwen."""
    if model.where == "demo":
        raise ValueError(f"{model.name}: the demo model ships with mlxqwen and cannot be removed")


def remove_model(model: LocalModel) -> None:
    """Delete a library model or a Hugging Face cache entry (all its revisions). The demo
    model ships with mlxqwen and stays."""
    check_removable(model)
    if model.where == "hf-cache":
        from huggingface_hub import constants, scan_cache_dir

        cache = scan_cache_dir(constants.HF_HUB_CACHE)
        repos = [r for r in cache.repos if r.repo_id == model.repo_id and r.repo_type == "model"]
        cache.delete_revisions(*(rev.commit_hash for r in repos for rev in r.revisions)).execute()
        return
    if model.path.is_dir():
        # renamed first, so that an interrupted removal never leaves a half model under its name
        trash = model.path.with_name(f".{model.path.name}.removing-{uuid.uuid4().hex[:8]}")
        os.replace(model.path, trash)
        shutil.rmtree(trash)
    else:
        model.path.unlink()


def model_at(path: Path) -> LocalModel:
    """The model directory or GGUF file at `path`, as the library would list it (named after it)."""
    path = path.expanduser().resolve()
    if path.is_file() and path.suffix == ".gguf":
        return LocalModel(path.stem, path, "gguf", "path", disk_size(path), path.stat().st_mtime, _gguf_type(path))
    config = _qwen_config(path) if path.is_dir() else None
    if config is None:
        raise ModelNotFoundError(f"{path}: not a Qwen model directory or GGUF file")
    return LocalModel(
        path.name, path, _directory_format(path), "path", disk_size(path), path.stat().st_mtime, _weights(config)
    )
