"""The MLX runtime: a Qwen model in MLX with its tokenizer and config.

Each sequence owns its per-layer caches. A batch decodes in one forward: the Gated DeltaNet
states of its sequences are stacked into one cache per layer while the batch stays the same
(stacked when it changes, written back to the sequences when it does), and attention reads
each sequence's own K/V (see `mlxqwen.cache`). One sequence alone runs on its own caches.

With the model's MTP head (`model.mtp`), each sequence also keeps the head's K/V cache, whose
entry t is the pair (hidden state t, token t+1). Every forward pass yields such pairs; the head
reads them when it next drafts (in one pass), and at once while a prompt is read. While no
guesses are made (the engine found they do not pay), the head forgets all but the last
`HEAD_RECENT` pairs instead of reading them, so that plain decoding does not pay for it; its
K/V then starts later than the sequence (`restore` cuts it by positions from the end)."""

from __future__ import annotations

import atexit
import itertools
import threading
import weakref
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from .. import distributed, memory
from ..cache import KVBatch, KVCache, LinearAttentionCache, QuantizedKVCache
from ..checkpoint import has_weights, read_json
from ..config import ModelConfig, Yarn, parse_yarn
from ..loader import default_dtype, load_model, model_from_config
from ..sampling import GenerationOptions, recommended_sampling
from ..speculative import HEAD_RECENT
from ..tokenizer import Tokenizer
from .runtime import Runtime


@dataclass
class _Snapshot:
    layers: list[Any]  # each layer cache's snapshot
    length: int
    head: tuple | None = None  # the MTP head's K/V
    last_hidden: mx.array | None = None


class _Sequence:
    def __init__(self, caches: list[Any], head: bool):
        self.caches = caches
        self.length = 0
        # the MTP head's state: its K/V, the pairs it has yet to read, the last hidden state (its token to come)
        self.head_cache = KVCache() if head else None
        self.waiting: list[tuple[mx.array, mx.array]] = []  # (hidden [1, n, H], tokens [n])
        self.waiting_pairs = 0  # the pairs in `waiting`, counted as they come: the decode step checks it
        self.last_hidden: mx.array | None = None  # [1, 1, H]


class MLXRuntime(Runtime):
    name = "MLX"

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Tokenizer,
        config: ModelConfig,
        path: Path,
        defaults: GenerationOptions,
        max_context: int,
        kv_capacity: int,
        dtype: mx.Dtype,
        kv_bits: int | None = None,
    ):
        if kv_bits is not None and kv_bits not in (4, 8):
            raise ValueError(f"kv_bits={kv_bits}: K/V quantization takes 4 or 8 bits")
        kv_group_size = memory.kv_group_size(config.head_dim) if kv_bits else 64  # as the memory estimate counts
        self.model, self.tokenizer, self.config, self.path = model, tokenizer, config, path
        self.defaults, self.max_context, self.kv_capacity = defaults, max_context, kv_capacity
        self.vocab_size = config.vocab_size
        self.kv_bits, self.kv_group_size, self.dtype = kv_bits, kv_group_size, dtype
        self.trimmable = not any(layer.is_linear for layer in model.layers)
        self.mtp = "mtp" in model
        self.identity = {
            "runtime": self.name,
            "model": str(path.resolve()),
            "weights": sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in path.glob("*.safetensors")),
            "dtype": str(dtype),
            "kv_bits": kv_bits,
            "kv_group_size": kv_group_size,
        }
        self._batch: list[_Sequence] = []  # the sequences whose Gated DeltaNet state lives in _batch_caches
        self._batch_caches: list[Any] = []
        self._fed = 0  # tokens per sequence of the last verify

    def new_cache(self) -> list[Any]:
        """Per-layer caches for one sequence, for calling `model` directly."""
        cache = self.model.make_cache()
        if self.kv_bits is None:
            return cache
        return [QuantizedKVCache(self.kv_bits, self.kv_group_size) if type(c) is KVCache else c for c in cache]

    # --- the runtime interface ------------------------------------------------------

    def new_sequence(self) -> _Sequence:
        return _Sequence(self.new_cache(), self.mtp)

    def release(self, seq: _Sequence) -> None:
        if seq in self._batch:
            self._unbatch()

    def prefill(self, seq: _Sequence, tokens: list[int]) -> None:
        if seq in self._batch:
            self._unbatch()
        # Only the cache is evaluated: the lm_head over the chunk is never computed.
        ids = mx.array([tokens])
        hidden = self.model.hidden(ids, cache=seq.caches)
        state = [c.state for c in seq.caches]
        if self.mtp:
            self._pairs(seq, hidden, ids[0])
            self._read_pairs([seq])
            state += [seq.head_cache.state, seq.last_hidden]
        mx.eval(state)
        mx.clear_cache()
        seq.length += len(tokens)

    def decode(self, seqs: Sequence[_Sequence], tokens: mx.array) -> mx.array:
        hidden = self.model.hidden(tokens[:, None], cache=self._caches(seqs))
        for i, seq in enumerate(seqs):
            seq.length += 1
            if self.mtp:
                self._pairs(seq, hidden[i : i + 1], tokens[i : i + 1])
                if seq.waiting_pairs >= 2 * HEAD_RECENT:  # nothing drafts: the head forgets what it has not read
                    self._forget(seq)
        return self.model.head(hidden[:, -1])

    def verify(self, seqs: Sequence[_Sequence], tokens: mx.array) -> mx.array:
        caches = self._caches(seqs)
        linear = [c for c in caches if isinstance(c, LinearAttentionCache)]
        for c in linear:
            c.keep_steps = True
        try:
            hidden = self.model.hidden(tokens, cache=caches)
        finally:
            for c in linear:
                c.keep_steps = False
        self._fed = tokens.shape[1]
        self._verified = (hidden, tokens)
        for seq in seqs:
            seq.length += self._fed
        return self.model.head(hidden)

    def commit(self, seqs: Sequence[_Sequence], accepted: Sequence[int]) -> None:
        for c in self._caches(seqs):
            if isinstance(c, LinearAttentionCache):
                c.commit(self._fed, accepted)
            else:
                for kv, n in zip(c if isinstance(c, KVBatch) else [c], accepted, strict=True):
                    kv.commit(self._fed, n)
        hidden, tokens = self._verified
        for i, (seq, n) in enumerate(zip(seqs, accepted, strict=True)):
            seq.length -= self._fed - n
            if self.mtp:
                self._pairs(seq, hidden[i : i + 1, :n], tokens[i, :n])

    def draft(self, seqs: Sequence[_Sequence], tokens: mx.array, depth: int, pick) -> mx.array:
        for i, seq in enumerate(seqs):  # the next token completes the last pair; the head reads it now
            self._pairs(seq, None, tokens[i : i + 1])
        out = self._read_pairs(seqs, always=True)  # [B, 1, H]: the head's output at each sequence's last pair
        head_caches = self._head_caches(seqs)
        guesses = []
        for step in range(depth):
            guesses.append(pick(self.model.head(out[:, -1])))
            if step + 1 < depth:  # chained: the head's output stands in for the model's hidden state
                out = self.model.mtp(out, self.model.embed(guesses[-1][:, None]), head_caches)
        for seq in seqs:  # the chained entries were guesses: the head keeps only true pairs
            seq.head_cache.commit(depth - 1, 0)
        return mx.stack(guesses, axis=1)

    def catch_up(self, seqs: Sequence[_Sequence]) -> None:
        if self.mtp and self._read_pairs(seqs) is not None:
            mx.eval([seq.head_cache.state for seq in seqs])

    def _pairs(self, seq: _Sequence, hidden: mx.array | None, tokens: mx.array) -> None:
        """Record a forward pass of `tokens` (a 1-D array) that gave `hidden` [1, T, H] (None: not fed
        yet): each token completes the pair of the hidden state before it."""
        before = seq.last_hidden
        if hidden is not None:
            seq.last_hidden = hidden[:, -1:]
            hidden = hidden[:, :-1]
        else:
            seq.last_hidden = None  # the next pass's first token has no pair: its pair is read now
        if before is not None:
            hidden = before if hidden is None or hidden.shape[1] == 0 else mx.concatenate([before, hidden], axis=1)
        elif tokens.size:
            tokens = tokens[1:]  # the first token of a sequence follows no hidden state
        if tokens.size:
            seq.waiting.append((hidden, tokens))
            seq.waiting_pairs += tokens.size

    def _forget(self, seq: _Sequence) -> None:
        """Empty the head's K/V and keep only the last `HEAD_RECENT` pairs waiting."""
        hidden = mx.concatenate([h for h, _ in seq.waiting], axis=1)
        tokens = mx.concatenate([t for _, t in seq.waiting])
        seq.waiting, seq.waiting_pairs = [(hidden[:, -HEAD_RECENT:], tokens[-HEAD_RECENT:])], HEAD_RECENT
        seq.head_cache = KVCache()

    def _read_pairs(self, seqs: Sequence[_Sequence], always: bool = False) -> mx.array | None:
        """Let the head read every waiting pair, in one pass over the batch (rows padded to the
        longest, the padding dropped from its cache after). Returns its output at each row's last pair
        (`always`: even when none waits; such a row's output guesses blindly)."""
        counts = [seq.waiting_pairs for seq in seqs]
        width = max(counts + [int(always)])
        if not width:
            return None
        hidden, tokens = [], []
        blank = (mx.zeros((1, 1, self.config.hidden_size), self.dtype), mx.array([0]))
        for seq in seqs:
            pairs = seq.waiting or [blank]  # a row with nothing to read still needs a row (its guesses fail)
            h = mx.concatenate([h for h, _ in pairs], axis=1)
            t = mx.concatenate([t for _, t in pairs])
            pad = width - h.shape[1]  # repeat the last pair: read, then cut from the cache
            hidden.append(mx.concatenate([h] + [h[:, -1:]] * pad, axis=1) if pad else h)
            tokens.append(mx.concatenate([t] + [t[-1:]] * pad) if pad else t)
            seq.waiting, seq.waiting_pairs = [], 0
        out = self.model.mtp(mx.concatenate(hidden), self.model.embed(mx.stack(tokens)), self._head_caches(seqs))
        for seq, n in zip(seqs, counts, strict=True):
            seq.head_cache.commit(width, n)
        rows = mx.arange(len(seqs))
        return out[rows, mx.maximum(mx.array(counts) - 1, 0)][:, None]

    def _head_caches(self, seqs: Sequence[_Sequence]) -> Any:
        return seqs[0].head_cache if len(seqs) == 1 else KVBatch(s.head_cache for s in seqs)

    def snapshot(self, seq: _Sequence) -> _Snapshot:
        if seq in self._batch:
            self._unbatch()
        snapshot = _Snapshot([c.snapshot() for c in seq.caches], seq.length)
        if self.mtp:
            self._read_pairs([seq])
            snapshot.head, snapshot.last_hidden = seq.head_cache.snapshot(), seq.last_hidden
        return snapshot

    def restore(self, seq: _Sequence, snapshot: _Snapshot, length: int) -> None:
        for c, state in zip(seq.caches, snapshot.layers, strict=True):
            c.restore(state)
            if isinstance(c, KVCache):
                c.offset = length
        seq.length = length
        if self.mtp and snapshot.head is not None:
            seq.head_cache.restore(snapshot.head)  # its last entry is the pair before the snapshot's last token
            seq.head_cache.offset = max(0, seq.head_cache.offset - (snapshot.length - length))
            # cut back, the hidden state before the next token is unknown: that one pair is skipped
            seq.last_hidden = snapshot.last_hidden if length == snapshot.length else None

    def snapshot_bytes(self, snapshot: _Snapshot) -> int:
        return sum(a.nbytes for a in self.save(snapshot).values())

    def save(self, snapshot: _Snapshot) -> dict[str, mx.array]:
        arrays = {"length": mx.array(snapshot.length)}
        for i, state in enumerate(snapshot.layers):
            for j, a in enumerate(_arrays(state)):
                arrays[f"{i}.{j}"] = a
        if snapshot.head is not None:
            arrays.update({f"head.{j}": a for j, a in enumerate(_arrays(snapshot.head))})
        if snapshot.last_hidden is not None:
            arrays["head.hidden"] = snapshot.last_hidden
        return arrays

    def load(self, arrays: dict[str, mx.array]) -> _Snapshot:
        arrays = dict(arrays)
        try:
            snapshot = _Snapshot([], int(arrays.pop("length")))
            for i, c in enumerate(self.new_sequence().caches):
                parts = []
                while f"{i}.{len(parts)}" in arrays:
                    parts.append(arrays.pop(f"{i}.{len(parts)}"))
                snapshot.layers.append(_state(c, parts, snapshot.length, self.config))
            if self.mtp and "head.0" in arrays:
                keys, values = arrays.pop("head.0"), arrays.pop("head.1")
                snapshot.head = (keys, values, keys.shape[2])
                snapshot.last_hidden = arrays.pop("head.hidden", None)
        except (KeyError, ValueError, TypeError, IndexError) as e:
            raise ValueError(f"a snapshot that does not fit this model ({e})") from None
        if arrays:
            raise ValueError(f"a snapshot with arrays this model does not have ({', '.join(arrays)})")
        return snapshot

    def settle(self) -> None:
        self._unbatch()

    def close(self) -> None:
        pass  # MLX frees arrays as soon as nothing references them

    # --- batches ----------------------------------------------------------------------

    def _caches(self, seqs: Sequence[_Sequence]) -> list[Any]:
        """The per-layer caches that run `seqs` together, in order."""
        if self._batch == list(seqs):
            return self._batch_caches
        self._unbatch()
        if len(seqs) == 1:
            return seqs[0].caches
        self._batch = list(seqs)
        self._batch_caches = [
            LinearAttentionCache.stack(group) if isinstance(group[0], LinearAttentionCache) else KVBatch(group)
            for group in zip(*(s.caches for s in seqs), strict=True)
        ]
        return self._batch_caches

    def _unbatch(self) -> None:
        """Give the batch's sequences their own Gated DeltaNet state back."""
        for i, c in enumerate(self._batch_caches):
            if isinstance(c, LinearAttentionCache):
                for row, seq in enumerate(self._batch):
                    seq.caches[i].restore(c.row(row))
        self._batch, self._batch_caches = [], []


# what rank 0 tells the other ranks to do (`DistributedRuntime`)
_NEW, _RELEASE, _PREFILL, _DECODE, _SNAPSHOT, _RESTORE, _SETTLE, _STOP = range(8)


class DistributedRuntime(MLXRuntime):
    """One rank of a model split across processes (`mlxqwen.distributed`). Rank 0 runs the engine:
    each call that computes or changes state is told to the other ranks first (`Placement.tell`),
    which make the same call on their part of the model (`follow`), so the engine, its sampling and
    its prefix cache are rank 0's alone. Sequences and snapshots are known to the others by number.
    Steps are evaluated at once, under the placement's watchdog. No MTP head: it would need its own
    split."""

    def __init__(self, *args, placement: distributed.Placement, **kwargs):
        super().__init__(*args, **kwargs)
        self.placement = placement
        self.identity["rank"] = f"{placement.parallel} {placement.rank}/{placement.size}"
        self._numbers = itertools.count()
        self._dropped: deque[int] = deque()  # snapshots rank 0 no longer holds, yet to tell (from any thread)
        self._stopped = False
        self._lock = threading.Lock()
        if placement.rank == 0:
            atexit.register(self._end)

    # --- rank 0 -------------------------------------------------------------------------
    # A call is told, then made, under a lock: the engine's thread and the one that ends the process
    # (`close` at exit) must not interleave their messages.

    def _tell(self, op: int, *numbers: int) -> None:
        if self._stopped:
            raise RuntimeError("the model's other ranks have stopped")
        dropped = [self._dropped.popleft() for _ in range(len(self._dropped))]
        self.placement.tell([op, len(dropped), *dropped, *numbers])

    def new_sequence(self) -> _Sequence:
        with self._lock:
            seq = super().new_sequence()
            seq.number = next(self._numbers)
            self._tell(_NEW, seq.number)
            return seq

    def release(self, seq: _Sequence) -> None:
        with self._lock:
            self._tell(_RELEASE, seq.number)
            super().release(seq)

    def prefill(self, seq: _Sequence, tokens: list[int]) -> None:
        with self._lock:
            self._tell(_PREFILL, seq.number, *tokens)
            self._prefill(seq, tokens)

    def decode(self, seqs: Sequence[_Sequence], tokens: mx.array) -> mx.array:
        with self._lock:
            self._tell(_DECODE, *(s.number for s in seqs), *tokens.tolist())
            return self._decode(seqs, tokens)

    def snapshot(self, seq: _Sequence) -> _Snapshot:
        with self._lock:
            snapshot = super().snapshot(seq)
            snapshot.number = next(self._numbers)
            self._tell(_SNAPSHOT, seq.number, snapshot.number)
        # when rank 0 lets go of it (not at exit, while the engine may still restore it)
        weakref.finalize(snapshot, self._dropped.append, snapshot.number).atexit = False
        return snapshot

    def restore(self, seq: _Sequence, snapshot: _Snapshot, length: int) -> None:
        with self._lock:
            self._tell(_RESTORE, seq.number, snapshot.number, length)
            super().restore(seq, snapshot, length)

    def settle(self) -> None:
        with self._lock:
            self._tell(_SETTLE)
            super().settle()

    def _end(self) -> None:
        # registered after the engine's own exit hook, so run before it: let the engines stop first
        from ..engine import _settle

        _settle()
        self.close()

    def close(self) -> None:
        with self._lock:
            if self.placement.rank == 0 and not self._stopped:
                self._tell(_STOP)
                self._stopped = True

    # --- every rank ---------------------------------------------------------------------

    def _prefill(self, seq: _Sequence, tokens: list[int]) -> None:
        if seq in self._batch:
            self._unbatch()
        hidden = self.model.hidden(mx.array([tokens]), cache=seq.caches)
        self.placement.evaluate([hidden] + [c.state for c in seq.caches], "reading a prompt")
        mx.clear_cache()
        seq.length += len(tokens)

    def _decode(self, seqs: Sequence[_Sequence], tokens: mx.array) -> mx.array:
        hidden = self.model.hidden(tokens[:, None], cache=self._caches(seqs))
        for seq in seqs:
            seq.length += 1
        return self.placement.evaluate(self.placement.logits(self.model, hidden[:, -1]), "decoding")

    def follow(self) -> None:
        """The other ranks' life: make rank 0's calls, until it stops."""
        held: dict[int, Any] = {}  # sequences and snapshots by number
        while True:
            op, n, *rest = self.placement.hear()
            for number in rest[:n]:
                held.pop(number, None)
            args = rest[n:]
            if op == _STOP:
                return
            if op == _NEW:
                held[args[0]] = MLXRuntime.new_sequence(self)
            elif op == _RELEASE:
                MLXRuntime.release(self, held.pop(args[0]))
            elif op == _PREFILL:
                self._prefill(held[args[0]], args[1:])
            elif op == _DECODE:
                batch = len(args) // 2
                self._decode([held[k] for k in args[:batch]], mx.array(args[batch:]))
            elif op == _SNAPSHOT:
                held[args[1]] = MLXRuntime.snapshot(self, held[args[0]])
            elif op == _RESTORE:
                MLXRuntime.restore(self, held[args[0]], held[args[1]], args[2])
            elif op == _SETTLE:
                MLXRuntime.settle(self)


def _arrays(state: tuple) -> list[mx.array]:
    """The arrays of one layer's snapshot (K/V: keys then values, each possibly quantized parts)."""
    out = []
    for part in state:
        if isinstance(part, mx.array):
            out.append(part)
        elif isinstance(part, tuple):
            out.extend(part)
    return out


def _state(cache: Any, parts: list[mx.array], length: int, cfg: ModelConfig) -> tuple:
    """One layer's snapshot from its saved arrays, checked against the layer."""
    if isinstance(cache, LinearAttentionCache):
        if len(parts) != 2 or parts[1].dtype != mx.float32 or parts[0].ndim != 3 or parts[1].ndim != 4:
            raise ValueError("Gated DeltaNet state")
        return tuple(parts)
    per_side = 3 if isinstance(cache, QuantizedKVCache) else 1
    if len(parts) != 2 * per_side:
        raise ValueError("K/V arrays")
    for p in parts:
        if p.ndim != 4 or p.shape[:3] != (1, cfg.num_key_value_heads, length):
            raise ValueError(f"K/V of shape {p.shape}")
    if per_side == 1:
        return parts[0], parts[1], length
    return tuple(parts[:3]), tuple(parts[3:]), length


def load(
    path: Path,
    *,
    dtype: mx.Dtype | None = None,
    lazy: bool = False,
    max_context: int | None = None,
    kv_bits: int | None = None,
    check_memory: bool = True,
    rope_scaling: dict[str, Any] | None = None,
    mtp: bool | str | Path = "auto",
    parallel: str = "pipeline",
) -> MLXRuntime:
    """A model directory on MLX; see `mlxqwen.load`. Inside `mlx.launch` with several processes,
    this process's part of it (`parallel`: "pipeline" or "tensor", see `mlxqwen.distributed`)."""
    dtype = dtype or default_dtype()
    placement = distributed.placement(parallel, dtype)
    model, config = load_model(
        path, dtype=dtype, lazy=True, yarn=parse_yarn(rope_scaling), mtp=mtp if placement is None else False,
        placement=placement,
    )  # fmt: skip
    generation_config = read_json(path / "generation_config.json")
    tokenizer = Tokenizer.from_dir(path, generation_config)
    held = config if placement is None else placement.rank_config(config)
    plan = model_sizing(model, held, dtype=dtype, kv_bits=kv_bits)
    max_context = memory.choose_context(plan, requested=max_context, check_memory=check_memory, where=str(path))
    if not lazy or placement is not None:  # a rank reads its part now, as its peers do
        mx.eval(model.parameters())
    defaults = GenerationOptions(**recommended_sampling(generation_config))
    # the requests running together share the K/V that the longest conversation that fits would hold
    capacity = max(memory.largest_context(plan), max_context) if check_memory else 1 << 40
    args = (model, tokenizer, config, path, defaults)
    if placement is None:
        return MLXRuntime(*args, max_context, capacity, dtype, kv_bits)
    max_context, capacity = placement.agree([max_context, capacity])  # what every rank has room for
    return DistributedRuntime(*args, max_context, capacity, dtype, kv_bits, placement=placement)


def model_sizing(
    model: nn.Module, config: ModelConfig, *, dtype: mx.Dtype | None = None, kv_bits: int | None = None
) -> memory.Sizing:
    """The memory policy's view of a model (built lazily, weights not read) as `load` runs it."""
    weights, dtype = memory.weight_bytes(model), dtype or default_dtype()
    return memory.mlx_sizing(
        config, weights=weights, dtype=dtype, kv_bits=kv_bits, prefill_chunk=MLXRuntime.prefill_chunk
    )


def sizing(
    path: Path, *, dtype: mx.Dtype | None = None, kv_bits: int | None = None, yarn: Yarn | None = None
) -> memory.Sizing:
    """The memory policy's view of the model in `path` as `load` runs it, reading no weight: from
    the checkpoint's tensor headers, or from config.json alone when the weights are not there yet."""
    model, config = _unread(path, dtype, yarn)
    return model_sizing(model, config, dtype=dtype, kv_bits=kv_bits)


def split_sizing(
    path: Path,
    hosts: list[str],
    budgets: list[int],
    parallel: str,
    *,
    dtype: mx.Dtype | None = None,
    kv_bits: int | None = None,
    yarn: Yarn | None = None,
) -> list[tuple[distributed.Part, memory.Sizing]]:
    """What each host would hold of the model in `path` split across `hosts` (whose memory budgets
    are `budgets`), and the memory policy's view of it there, reading no weight."""
    model, config = _unread(path, dtype, yarn)
    dtype = dtype or default_dtype()
    parts = distributed.plan(model, config, hosts, budgets, parallel, dtype)
    options = dict(dtype=dtype, kv_bits=kv_bits, prefill_chunk=MLXRuntime.prefill_chunk)
    return [(part, memory.mlx_sizing(part.config, weights=part.weights, **options)) for part in parts]


def _unread(path: Path, dtype: mx.Dtype | None, yarn: Yarn | None) -> tuple[nn.Module, ModelConfig]:
    """The model as `load` builds it, from the checkpoint's tensor headers, or from config.json alone
    when the weights are not there yet; no weight is read."""
    if has_weights(path):
        return load_model(path, dtype=dtype, lazy=True, yarn=yarn)
    return model_from_config(path, dtype=dtype, yarn=yarn)
