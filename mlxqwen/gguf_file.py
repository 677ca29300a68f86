"""The header of a GGUF file: its metadata and the size of its tensor data, read without
loading the model (`mlxqwen fit`, and the memory check before llama.cpp maps any weight).

The layout is GGUF's (version 2 and 3): magic, version, tensor and key counts, the key/value
pairs, the tensor infos, then the tensor data from the next multiple of `general.alignment`.
gguf-py's `GGUFReader` parses every string of the vocabulary into numpy views on the way,
which takes 38 s for a 248k-token vocabulary; this scan steps over arrays of strings and
keeps only their length."""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from .errors import ModelLoadError

# GGUF value types: the struct format of each scalar; 8 is a string, 9 an array
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_SPLIT = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$")


@dataclass(frozen=True)
class GGUFHeader:
    metadata: dict[str, Any]  # arrays of strings (the vocabulary) hold only their length
    tensors: int  # tensors in this file and the other parts of a split model
    data_bytes: int  # their data


class _Reader:
    def __init__(self, f: BinaryIO, path: Path):
        self.f, self.path = f, path

    def unpack(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        data = self.f.read(size)
        if len(data) < size:
            raise ModelLoadError(f"{self.path}: truncated GGUF header")
        return struct.unpack(fmt, data)[0]

    def string(self) -> str:
        n = self.unpack("<Q")
        return self.f.read(n).decode(errors="replace")

    def value(self, kind: int) -> Any:
        if kind in _SCALARS:
            return self.unpack(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind != _ARRAY:
            raise ModelLoadError(f"{self.path}: unknown GGUF value type {kind}")
        item, n = self.unpack("<I"), self.unpack("<Q")
        if item == _STRING:
            for _ in range(n):
                self.f.seek(self.unpack("<Q"), 1)
            return n
        if item not in _SCALARS:
            raise ModelLoadError(f"{self.path}: unsupported GGUF array of type {item}")
        fmt = _SCALARS[item]
        data = self.f.read(n * struct.calcsize(fmt))
        return list(struct.unpack(f"<{n}{fmt[1]}", data))


def _read_one(path: Path) -> tuple[dict[str, Any], int, int]:
    """(metadata, number of tensors, bytes of tensor data) of one GGUF file."""
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise ModelLoadError(f"{path}: not a GGUF file")
            r = _Reader(f, path)
            version = r.unpack("<I")
            if version not in (2, 3):
                raise ModelLoadError(f"{path}: GGUF version {version} is not supported")
            n_tensors, n_keys = r.unpack("<Q"), r.unpack("<Q")
            metadata = {}
            for _ in range(n_keys):
                key = r.string()
                metadata[key] = r.value(r.unpack("<I"))
            for _ in range(n_tensors):  # name, dimensions, type, offset
                r.string()
                f.seek(8 * r.unpack("<I") + 4 + 8, 1)
            alignment = int(metadata.get("general.alignment", 32))
            start = -(-f.tell() // alignment) * alignment
            size = f.seek(0, 2)
    except OSError as e:
        raise ModelLoadError(f"{path}: cannot be read ({e.strerror})") from None
    if size < start:
        raise ModelLoadError(f"{path}: truncated GGUF file")
    return metadata, n_tensors, size - start


def read_header(path: str | Path) -> GGUFHeader:
    """The metadata of a GGUF model, and the bytes of its tensor data (all parts of a split model)."""
    path = Path(path)
    metadata, tensors, data = _read_one(path)
    split = _SPLIT.search(path.name)
    if split and int(split[2]) > 1:
        for i in range(2, int(split[2]) + 1):
            _, more, part = _read_one(path.with_name(_SPLIT.sub(f"-{i:05d}-of-{split[2]}.gguf", path.name)))
            tensors, data = tensors + more, data + part
    return GGUFHeader(metadata, tensors, data)
