"""Model states kept by token prefix, so a request resumes where an earlier one left off.

An entry is a runtime snapshot and the exact tokens it holds. A prompt resumes from the entry
that covers the longest prefix of it: on a model with Gated DeltaNet layers only an entry whose
tokens are all a prefix of the prompt serves (a recurrent state cannot be cut back); on a pure
K/V model any entry serves up to the tokens it shares with the prompt.

Entries live in memory under a byte budget (least recently used go first; pinned entries, which
a `ChatSession` holds, stay). With a directory, every entry is also written there (safetensors,
a background thread, temporary name then rename) under a byte budget of its own, in a folder
named after the model's identity, so a restart or another process finds it. A file that cannot
be read, or holds what does not fit the model, is deleted and ignored. The writer thread only
copies bytes (MLX stays in the engine's thread) and runs while it has files to write; the
engine waits for it when the process ends."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from safetensors import TensorSpec, safe_open, serialize_file

from .backends.runtime import Runtime

FORMAT = "mlxqwen-prefix-1"
_log = logging.getLogger("mlxqwen.prefix_cache")
# safetensors' name for each MLX dtype, and the same-width type numpy can hold it as
_DTYPES = {
    mx.float32: ("float32", mx.float32),
    mx.float16: ("float16", mx.float16),
    mx.bfloat16: ("bfloat16", mx.uint16),
    mx.uint32: ("uint32", mx.uint32),
    mx.int32: ("int32", mx.int32),
    mx.uint8: ("uint8", mx.uint8),
}


@dataclass(eq=False)
class Entry:
    tokens: np.ndarray  # int32
    snapshot: Any = None  # the runtime's, while in memory
    nbytes: int = 0
    file: Path | None = None
    pins: int = field(default=0, repr=False)

    def __len__(self) -> int:
        return len(self.tokens)


def _key(tokens: np.ndarray) -> str:
    return hashlib.sha256(tokens.astype(np.int32).tobytes()).hexdigest()[:32]


def _shared(a: np.ndarray, b: np.ndarray) -> int:
    """How many leading tokens a and b have in common."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n


class PrefixCache:
    """budget: bytes of snapshots kept in memory (0: only pinned ones). directory: the disk tier's
    root (None: no disk tier); disk_budget: its bytes."""

    def __init__(self, runtime: Runtime, budget: int, directory: Path | None = None, disk_budget: int = 16 << 30):
        self.runtime = runtime
        self.budget = budget
        self._memory: OrderedDict[str, Entry] = OrderedDict()  # least recently used first
        self._disk: dict[str, Entry] = {}  # on disk, not in memory
        self._lock = threading.Lock()  # _disk is also changed by the writer thread
        self.directory = None
        if directory is not None:
            identity = json.dumps(runtime.identity, sort_keys=True, default=str)
            self.directory = Path(directory) / hashlib.sha256(identity.encode()).hexdigest()[:24]
            self.disk_budget = disk_budget
            self._identity = identity
            self._writes: deque[tuple[Path, dict]] = deque()  # under _lock
            self._writer: threading.Thread | None = None  # alive while _writes has work
            self._scan()

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self._memory.values())

    def __len__(self) -> int:
        return len(self._memory)

    def clear(self) -> None:
        """Forget every unpinned entry in memory (files stay)."""
        for key, entry in list(self._memory.items()):
            if not entry.pins:
                del self._memory[key]

    # --- finding -----------------------------------------------------------------------

    def lookup(self, prompt: list[int]) -> tuple[Entry | None, int]:
        """The entry that serves the longest prefix of `prompt` short of its last token, and how
        many tokens of it serve."""
        tokens = np.asarray(prompt, np.int32)
        best, best_n = None, 0
        with self._lock:
            candidates = [*self._memory.values(), *self._disk.values()]
        for entry in candidates:
            shared = _shared(entry.tokens, tokens)
            if self.runtime.trimmable:
                n = min(shared, len(tokens) - 1)
            else:
                n = len(entry) if shared == len(entry) < len(tokens) else 0
            if n > best_n or (n == best_n and n and entry.snapshot is not None and best.snapshot is None):
                best, best_n = entry, n
        return best, best_n

    def take(self, entry: Entry) -> Any | None:
        """The snapshot of `entry` (read from disk if need be); None when its file is unusable."""
        if entry.snapshot is None:
            entry.snapshot = self._read(entry)
            if entry.snapshot is None:
                return None
            entry.nbytes = self.runtime.snapshot_bytes(entry.snapshot)
            with self._lock:
                self._disk.pop(_key(entry.tokens), None)
            self._memory[_key(entry.tokens)] = entry
            self._evict()
        self._memory.move_to_end(_key(entry.tokens))
        return entry.snapshot

    # --- storing -----------------------------------------------------------------------

    def store(self, tokens: list[int], snapshot: Any, pin: bool = False) -> Entry | None:
        """Keep `snapshot` (the state after `tokens`). Returns the entry that now serves `tokens`,
        or None when the budget keeps nothing unpinned."""
        array = np.asarray(tokens, np.int32)
        key = _key(array)
        entry = self._memory.get(key)
        if entry is None and self.runtime.trimmable:
            # a K/V snapshot serves its prefixes: keep one entry per line of conversation
            entry = next(
                (e for e in self._memory.values() if len(e) > len(array) and _shared(e.tokens, array) == len(array)),
                None,
            )
            if entry is None:
                for k, e in list(self._memory.items()):
                    if not e.pins and len(e) < len(array) and _shared(e.tokens, array) == len(e):
                        del self._memory[k]
        if entry is None:
            if not pin and not self.budget:
                return None
            mx.eval(self.runtime.save(snapshot))
            entry = Entry(array, snapshot, self.runtime.snapshot_bytes(snapshot))
            self._memory[key] = entry
            self._write(entry)
        if pin:
            entry.pins += 1
        self._memory.move_to_end(_key(entry.tokens))
        self._evict()
        return entry

    def unpin(self, entry: Entry) -> None:
        entry.pins -= 1
        self._evict()

    def _evict(self) -> None:
        total = self.nbytes
        for key, entry in list(self._memory.items()):
            if total <= self.budget:
                break
            if not entry.pins:
                del self._memory[key]
                total -= entry.nbytes
                if entry.file is not None and entry.file.exists():
                    entry.snapshot = None
                    with self._lock:
                        self._disk[key] = entry

    # --- the disk tier -------------------------------------------------------------------

    def _scan(self) -> None:
        if not self.directory.is_dir():
            return
        for file in self.directory.glob("*.safetensors"):
            try:
                with safe_open(file, "numpy") as f:
                    if f.metadata().get("format") != FORMAT or f.metadata().get("identity") != self._identity:
                        raise ValueError("another model's or format's")
                    tokens = f.get_tensor("tokens").astype(np.int32)
            except Exception as e:  # any unreadable file is dropped: it is only a cache
                _log.info("dropping %s: %s", file, e)
                file.unlink(missing_ok=True)
                continue
            self._disk[_key(tokens)] = Entry(tokens, file=file)

    def _read(self, entry: Entry) -> Any | None:
        try:
            arrays = mx.load(str(entry.file))
            if not np.array_equal(np.array(arrays.pop("tokens")), entry.tokens):
                raise ValueError("its tokens differ from its index")
            snapshot = self.runtime.load(arrays)
            os.utime(entry.file)  # least recently used goes first
            return snapshot
        except Exception as e:
            _log.info("dropping %s: %s", entry.file, e)
            entry.file.unlink(missing_ok=True)
            with self._lock:
                self._disk.pop(_key(entry.tokens), None)
            return None

    def _write(self, entry: Entry) -> None:
        if self.directory is None:
            return
        entry.file = self.directory / f"{_key(entry.tokens)}.safetensors"
        arrays = {"tokens": mx.array(entry.tokens), **self.runtime.save(entry.snapshot)}
        mx.eval(arrays)
        # numpy views of the evaluated buffers: the writer thread reads them without MLX
        views = {}
        for name, a in arrays.items():
            dtype, holder = _DTYPES[a.dtype]
            views[name] = (dtype, a.shape, np.asarray(a.view(holder)))
        with self._lock:
            self._writes.append((entry.file, views))
            if self._writer is None:
                self._writer = threading.Thread(target=self._write_files, name="mlxqwen-prefix-writer")
                self._writer.start()

    def flush(self) -> None:
        """Wait until every entry handed to the writer is on disk."""
        writer = getattr(self, "_writer", None)
        if writer is not None:
            writer.join()

    def _write_files(self) -> None:
        metadata = {"format": FORMAT, "identity": self._identity}
        while True:
            with self._lock:
                if not self._writes:
                    self._writer = None
                    return
                file, views = self._writes.popleft()
            temporary = file.with_name(f".{file.stem}.partial")
            specs = {
                name: TensorSpec(dtype=dtype, shape=shape, data_ptr=v.ctypes.data, data_len=v.nbytes)
                for name, (dtype, shape, v) in views.items()
            }
            try:
                file.parent.mkdir(parents=True, exist_ok=True)
                serialize_file(specs, str(temporary), metadata=metadata)
                os.replace(temporary, file)
                self._trim_disk()
            except OSError as e:
                _log.warning("prefix cache: cannot write %s (%s)", file, e)
                temporary.unlink(missing_ok=True)

    def _trim_disk(self) -> None:
        files = sorted(self.directory.glob("*.safetensors"), key=lambda f: f.stat().st_mtime)
        total = sum(f.stat().st_size for f in files)
        for file in files:
            if total <= self.disk_budget:
                break
            total -= file.stat().st_size
            file.unlink(missing_ok=True)
            with self._lock:
                for key, entry in list(self._disk.items()):
                    if entry.file == file:
                        del self._disk[key]
