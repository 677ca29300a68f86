"""Safetensors shards written as they fill, and the index that maps each tensor to its shard
(mlx-lm's layout: `model.safetensors` or `model-0000i-of-0000n.safetensors`, plus
`model.safetensors.index.json`)."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import mlx.core as mx

from mlxqwen.errors import ConvertError


class ShardWriter:
    def __init__(self, directory: Path, max_bytes: int):
        self.directory, self.max_bytes = directory, max_bytes
        self.pending: dict[str, mx.array] = {}
        self.pending_bytes = 0
        self.files: list[list[str]] = []  # tensor names per written shard
        self.total_bytes = 0

    def add(self, name: str, array: mx.array) -> None:
        """Add an evaluated tensor; the current shard is written first if it would overflow."""
        if self.pending and self.pending_bytes + array.nbytes > self.max_bytes:
            self.flush()
        self.pending[name] = array
        self.pending_bytes += array.nbytes
        self.total_bytes += array.nbytes

    def flush(self) -> None:
        if not self.pending:
            return
        file = self._name(len(self.files))
        try:
            mx.save_safetensors(str(file), self.pending, metadata={"format": "mlx"})
        except (OSError, RuntimeError) as e:
            if getattr(e, "errno", None) == errno.ENOSPC or shutil.disk_usage(self.directory).free < self.pending_bytes:
                raise ConvertError(f"{file}: disk full while writing the converted weights") from None
            raise ConvertError(f"{file}: cannot write ({e})") from None
        self.files.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> list[Path]:
        """Write the last shard, give every shard its final name and write the index."""
        self.flush()
        n = len(self.files)
        final = [
            self.directory / ("model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors")
            for i in range(n)
        ]
        for i, path in enumerate(final):
            self._name(i).rename(path)
        weight_map = {name: path.name for path, names in zip(final, self.files, strict=True) for name in names}
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=4))
        return final

    def _name(self, i: int) -> Path:
        return self.directory / f"model-{i + 1:05d}.partial.safetensors"
