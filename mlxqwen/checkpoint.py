"""Reading a checkpoint directory: its JSON files (config, generation config, tokenizer config)
and safetensors shards, checked before use.

Tensors are opened lazily (memory-mapped by MLX), so reading never holds the whole
checkpoint twice."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Any

import mlx.core as mx

from .errors import ModelLoadError

GGUF_MAGIC = b"GGUF"
# the parts after the first of a split model (llama.cpp opens the first and finds the rest)
_LATER_SPLIT = re.compile(r"-(?!00001-)\d{5}-of-\d{5}\.gguf$")


def read_json(file: Path) -> dict[str, Any]:
    """A JSON object from a checkpoint file, or {} when the file is absent."""
    if not file.is_file():
        return {}
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{file}: invalid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{file}: expected a JSON object")
    return data


def read_config(path: Path) -> dict[str, Any]:
    file = path / "config.json"
    if not file.is_file():
        raise ModelLoadError(f"{file}: not found; a model directory needs its config.json")
    return read_json(file)


def safetensors_header(file: Path) -> dict[str, Any]:
    """Parse and check a .safetensors header against the file's size (catches truncation)."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ModelLoadError(f"{file}: truncated or not a safetensors file")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:
            raise ModelLoadError(f"{file}: truncated or not a safetensors file (header past end of file)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ModelLoadError(f"{file}: corrupt safetensors header") from None
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise ModelLoadError(f"{file}: truncated ({size} bytes, tensors need {8 + n + end}); download it again")
    return header


def has_weights(path: Path) -> bool:
    """Whether the directory holds safetensors weights (or an index of them), not only a config."""
    return (path / "model.safetensors.index.json").is_file() or any(path.glob("*.safetensors"))


def shard_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError):
            raise ModelLoadError(f"{index}: invalid index (expected a 'weight_map')") from None
        files = [path / name for name in dict.fromkeys(weight_map.values())]
        for file in files:
            if not file.is_file():
                raise ModelLoadError(f"{file}: shard listed in {index.name} is missing")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{path}: no .safetensors weights found")
    return files


def read_weights(path: Path) -> tuple[dict[str, mx.array], dict[str, Path]]:
    """All tensors of a checkpoint (lazy), and the file each came from."""
    weights: dict[str, mx.array] = {}
    origin: dict[str, Path] = {}
    for file in shard_files(path):
        safetensors_header(file)
        try:
            tensors = mx.load(str(file))
        except Exception as e:  # MLX raises bare RuntimeError/ValueError on bad files
            raise ModelLoadError(f"{file}: cannot be read ({e})") from None
        weights.update(tensors)
        origin.update(dict.fromkeys(tensors, file))
    return weights, origin


def is_gguf(file: Path) -> bool:
    """Whether `file` is a GGUF file: by its name, or by its first bytes whatever its name."""
    if file.suffix == ".gguf":
        return True
    try:
        with open(file, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def gguf_file(path: Path) -> Path | None:
    """The GGUF model that `path` is, or that the directory `path` holds (None: no GGUF).
    Vision projectors (mmproj-*.gguf) and the later parts of a split model don't count."""
    if path.is_file():
        return path if is_gguf(path) else None
    if not path.is_dir():
        return None
    found = sorted(
        f for f in path.glob("*.gguf") if not f.name.startswith("mmproj") and not _LATER_SPLIT.search(f.name)
    )
    if len(found) > 1:
        names = ", ".join(f.name for f in found)
        raise ModelLoadError(f"{path}: several GGUF models ({names}); pass the file to load")
    return found[0] if found else None
