"""The llama.cpp runtime: a GGUF model run by llama.cpp (through llama-cpp-python's C API)
behind the same engine as MLX, so `generate`, `stream`, `chat`, the CLI and the TUI work
the same. llama.cpp computes the logits; sampling, stop strings, parsing and stats are the
engine's. The GGUF's own tokenizer and chat template are used.

One llama.cpp context holds every live sequence, each in a sequence slot (`n_seq_max` of
them), their K/V in one shared pool of `n_ctx` cells; a decode step is one `llama_batch`
with a token for each sequence. Speculative verification cuts rejected tokens with
`llama_memory_seq_rm`: for the K/V cache that forgets positions; the Gated DeltaNet layers of
Qwen3.5/3.6 keep a recurrent state that llama.cpp rolls back only by up to `n_rs_seq` tokens,
keeping that many per-token copies of it (`rollback`).

Snapshots copy a sequence's whole state out to host memory (`llama_state_seq_get_data_ext`)
and back into a slot: nothing is recomputed. llama-cpp-python's own `Llama` cannot cut a
recurrent state back to a shorter prefix, so it re-reads the whole conversation every turn
on these models (benchmarks/bench_llama.py counts it); the engine resumes from snapshots
taken at turn boundaries instead.

A Qwen3.5/3.6 GGUF may carry the model's multi-token-prediction head (`nextn` tensors,
`mlxqwen convert --to gguf` writes them). Loaded (`load_mtp`), it runs in a second context of
type LLAMA_CONTEXT_TYPE_MTP, as llama.cpp's own speculative decoding does: every token the
target reads is also read by the head, paired with the target's hidden state (after its final
norm) at the token before, which the target outputs for every token (`llama_set_embeddings_nextn`,
llama.cpp's staging API that llama-cpp-python binds in `llama_cpp_ext`). The head reads them
lazily, in one batch with its first guess (`draft`); its own K/V is cut like the target's. While
no guesses are made (the engine found they do not pay), the head forgets all but the last
`HEAD_RECENT` tokens instead of reading them: a restart of its K/V (llama.cpp takes a sequence's
first position anywhere), so that plain decoding pays only for the target's hidden states."""

from __future__ import annotations

import ctypes
import logging
import os
import resource
import sys
import weakref
from collections.abc import Callable, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any, NamedTuple

import llama_cpp as llama
import mlx.core as mx
import numpy as np
from llama_cpp import llama_cpp_ext

from .. import memory
from ..chat_template import ChatTemplate
from ..checkpoint import read_json
from ..config import Yarn, parse_yarn
from ..errors import ModelLoadError
from ..sampling import GenerationOptions, recommended_sampling
from ..speculative import HEAD_RECENT, MAX_DEPTH
from ..tokenizer import Tokenizer
from .runtime import Runtime

PREFILL_CHUNK = 512  # tokens per llama_decode call while reading a prompt
DEFAULT_CONTEXT = 32768  # llama.cpp allocates the whole K/V cache up front, so the default stays modest

# K/V cache types: the compute dtype's (as MLX's `dtype`), or 8/4-bit blocks (`kv_bits`)
_KV_TYPES = {mx.float32: "f32", mx.float16: "f16", mx.bfloat16: "bf16"}
_KV_BITS = {8: "q8_0", 4: "q4_0"}
_GGML_TYPES = {
    "f32": llama.GGML_TYPE_F32,
    "f16": llama.GGML_TYPE_F16,
    "bf16": 30,  # GGML_TYPE_BF16, which llama-cpp-python does not name
    "q8_0": llama.GGML_TYPE_Q8_0,
    "q4_0": llama.GGML_TYPE_Q4_0,
}

_FLOATS = ctypes.POINTER(ctypes.c_float)

_GGML_LOG_ERROR = 4  # ggml's current numbering (llama-cpp-python's own log hook still has the old one)
_log = logging.getLogger("mlxqwen.llama_cpp")
_errors: list[str] = []  # llama.cpp's error messages since the last load began: the first is the cause


@llama.llama_log_callback
def _on_log(level: int, text: bytes, _: ctypes.c_void_p) -> None:
    """llama.cpp's log, to the `mlxqwen.llama_cpp` logger (debug); errors are kept for our messages."""
    message = text.decode(errors="replace")
    _log.debug(message.rstrip())
    if level == _GGML_LOG_ERROR and len(_errors) < 8:
        _errors.append(message.strip())


llama.llama_log_set(_on_log, ctypes.c_void_p(0))
llama.llama_backend_init()


class _Vocab:
    """A GGUF's tokenizer as llama.cpp runs it, in the form `mlxqwen.tokenizer.Tokenizer` wraps."""

    def __init__(self, vocab: Any):
        self.vocab = vocab
        self.vocab_size = llama.llama_vocab_n_tokens(vocab)
        control = llama.LLAMA_TOKEN_ATTR_CONTROL
        self.special = {i for i in range(self.vocab_size) if llama.llama_vocab_get_attr(vocab, i) & control}

    def encode(self, text: str) -> list[int]:
        data = text.encode()
        ids = (llama.llama_token * (len(data) + 1))()
        n = llama.llama_tokenize(self.vocab, data, len(data), ids, len(ids), False, True)
        return ids[:n]

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        tokens = (llama.llama_token * len(ids))(*ids)
        size = 16 * len(ids) + 16
        while True:
            text = ctypes.create_string_buffer(size)
            n = llama.llama_detokenize(self.vocab, tokens, len(ids), text, size, False, not skip_special_tokens)
            if n >= 0:
                return text.raw[:n].decode(errors="replace")
            size = -n

    @cached_property
    def _ids(self) -> dict[str, int]:
        return {self.id_to_token(i): i for i in range(self.vocab_size)}

    def token_to_id(self, token: str) -> int | None:
        return self._ids.get(token)

    def id_to_token(self, i: int) -> str | None:
        return llama.llama_vocab_get_text(self.vocab, i).decode() if 0 <= i < self.vocab_size else None

    def end_of_generation(self) -> set[int]:
        """llama.cpp's end-of-generation tokens (for Qwen <|im_end|>, <|endoftext|>, ...)."""
        candidates = self.special | {llama.llama_vocab_eos(self.vocab), llama.llama_vocab_eot(self.vocab)}
        return {i for i in candidates if i >= 0 and llama.llama_vocab_is_eog(self.vocab, i)}


class _Sequence:
    def __init__(self, slot: int):
        self.slot = slot  # llama.cpp's seq_id
        self.length = 0
        # For the MTP head: the target's hidden state after the last token fed (none before the
        # first), and the last tokens fed that the head has not read yet, each with the target's
        # hidden state after the token before it (the first token has no row, as in training).
        self.hidden: np.ndarray | None = None
        self.unread: list[tuple[int, np.ndarray]] = []


class _Snapshot(NamedTuple):
    state: bytes  # the target's (llama_state_seq_get_data_ext)
    length: int
    head: bytes = b""  # the MTP head's K/V, when it is loaded
    hidden: np.ndarray | None = None  # the target's hidden state after the last token


class LlamaCppRuntime(Runtime):
    """A GGUF model in llama.cpp; see `load`."""

    name = "llama.cpp"
    config = None

    def __init__(self, path: Path, model: Any, ctx: Any, head: Any, n_ctx: int, kv_type: str, rollback: int):
        """Takes `model`, `ctx` (its context, from `_new_context`) and `head` (its MTP context, or
        None) over: they are freed with it."""
        self.path = path
        self.model = model
        self.ctx = ctx
        self.head = head
        self.slots = llama.llama_n_seq_max(ctx)
        self.batch = llama.llama_batch_init(max(PREFILL_CHUNK, self.slots * (rollback + 1)), 0, 1)
        self.head_batch = llama.llama_batch_ext_init(head) if head else None
        self._free = weakref.finalize(self, _free, model, ctx, self.batch, head, self.head_batch)
        self._free.atexit = False  # the process's end frees it; llama.cpp may be torn down first
        self.memory = llama.llama_get_memory(ctx)
        self.mtp = head is not None
        self.width = llama.llama_model_n_embd_out(model)  # of the hidden states the head reads
        if head:
            self.head_memory = llama.llama_get_memory(head)
            # hidden states of every token (not only those with logits), in the order they were fed
            llama_cpp_ext.llama_set_embeddings_nextn(ctx, True, False)
            llama_cpp_ext.llama_set_embeddings_nextn(head, True, False)
        self.max_context = self.kv_capacity = n_ctx
        self.prefill_chunk = PREFILL_CHUNK
        recurrent = llama.llama_model_is_hybrid(model) or llama.llama_model_is_recurrent(model)
        self.trimmable = not recurrent
        self.rollback = llama.llama_n_rs_seq(ctx) if recurrent else PREFILL_CHUNK
        self.identity = {
            "runtime": self.name,
            "model": str(path.resolve()),
            "weights": (path.stat().st_size, path.stat().st_mtime_ns),
            "kv_type": kv_type,
        }
        self._free_slots = list(range(self.slots - 1, -1, -1))
        self._fed = 0  # tokens per sequence of the last verify

        vocab = _Vocab(llama.llama_model_get_vocab(model))
        self.vocab_size = vocab.vocab_size
        tokens = {
            "bos_token": vocab.id_to_token(llama.llama_vocab_bos(vocab.vocab)),
            "eos_token": vocab.id_to_token(llama.llama_vocab_eos(vocab.vocab)),
        }
        template = llama.llama_model_chat_template(model, None)
        self.tokenizer = Tokenizer(
            vocab,
            tokens,
            {"eos_token_id": sorted(vocab.end_of_generation())},
            ChatTemplate(template.decode(), tokens) if template else None,
        )
        self.defaults = GenerationOptions(**_sampling(model, path))

    def close(self) -> None:
        """Free the model and its context now (else when it is collected)."""
        self._free()

    # --- the runtime interface ------------------------------------------------------

    def new_sequence(self) -> _Sequence:
        if not self._free_slots:
            raise RuntimeError(f"all {self.slots} llama.cpp sequence slots are in use")
        return _Sequence(self._free_slots.pop())

    def release(self, seq: _Sequence) -> None:
        llama.llama_memory_seq_rm(self.memory, seq.slot, -1, -1)
        if self.head:
            llama.llama_memory_seq_rm(self.head_memory, seq.slot, -1, -1)
        self._free_slots.append(seq.slot)

    def prefill(self, seq: _Sequence, tokens: list[int]) -> None:
        self._decode([(seq, tokens)], logits=False)
        self.catch_up([seq])

    def decode(self, seqs: Sequence[_Sequence], tokens: mx.array) -> mx.array:
        ids = tokens.tolist()  # waits for the engine's draws
        logits = self._decode([(seq, [t]) for seq, t in zip(seqs, ids, strict=True)], logits=True)[:, 0]
        for seq in seqs:
            if len(seq.unread) >= 2 * HEAD_RECENT:  # nothing drafts: the head forgets what it has not read
                llama.llama_memory_seq_rm(self.head_memory, seq.slot, -1, -1)
                del seq.unread[:-HEAD_RECENT]
        return logits

    def verify(self, seqs: Sequence[_Sequence], tokens: mx.array) -> mx.array:
        self._fed = tokens.shape[1]
        if self._fed - 1 > self.rollback:
            raise ValueError(
                f"llama.cpp keeps {self.rollback} recurrent states to go back to, fewer than {self._fed - 1}"
            )
        return self._decode(list(zip(seqs, tokens.tolist(), strict=True)), logits=True)

    def commit(self, seqs: Sequence[_Sequence], accepted: Sequence[int]) -> None:
        for seq, n in zip(seqs, accepted, strict=True):
            if n < self._fed:
                seq.length -= self._fed - n
                if not llama.llama_memory_seq_rm(self.memory, seq.slot, seq.length, -1):
                    raise RuntimeError(f"llama.cpp could not cut a sequence back to {seq.length} tokens")
                if self.head:  # the cut tokens are ones the head has not read yet
                    seq.hidden = seq.unread[n - self._fed][1]
                    del seq.unread[n - self._fed :]

    def draft(
        self, seqs: Sequence[_Sequence], tokens: mx.array, depth: int, pick: Callable[[mx.array], mx.array]
    ) -> mx.array:
        if not self.head:
            return super().draft(seqs, tokens, depth, pick)
        # the head's first step reads, in the same batch, what it has not read yet
        rows = self._unread(seqs)
        for seq, token in zip(seqs, tokens.tolist(), strict=True):
            hidden = seq.hidden if seq.hidden is not None else np.zeros(self.width, np.float32)  # after a restart
            rows.append((seq.slot, seq.length, token, hidden, True))
        guesses: list[list[int]] = []
        try:
            for step in range(depth):
                logits, hidden = self._head_decode(rows)
                guesses.append(pick(mx.array(logits)).tolist())
                # chained: the next step reads this guess with the head's own hidden state
                after = zip(seqs, guesses[-1], hidden, strict=True)
                rows = [(seq.slot, seq.length + step + 1, t, h, True) for seq, t, h in after]
        finally:
            for seq in seqs:  # the guesses are read again, by the target and the head, if verified
                llama.llama_memory_seq_rm(self.head_memory, seq.slot, seq.length, -1)
        return mx.array(np.array(guesses, np.int32).reshape(depth, len(seqs)).T)

    def snapshot(self, seq: _Sequence) -> _Snapshot:
        if not self.head:
            return _Snapshot(_copy_state(self.ctx, seq.slot), seq.length)
        self.catch_up([seq])
        return _Snapshot(_copy_state(self.ctx, seq.slot), seq.length, _copy_state(self.head, seq.slot), seq.hidden)

    def restore(self, seq: _Sequence, snapshot: _Snapshot, length: int) -> None:
        if not _set_state(self.ctx, seq.slot, snapshot.state):
            llama.llama_memory_seq_rm(self.memory, seq.slot, -1, -1)
            raise ValueError("llama.cpp refused a saved state")
        if not llama.llama_memory_seq_rm(self.memory, seq.slot, length, -1):
            raise RuntimeError(f"llama.cpp could not cut a sequence back to {length} tokens")
        seq.length = length
        if self.head:
            # a snapshot without the head's state (or cut shorter) restarts it: its drafts get worse, not wrong
            if not (snapshot.head and _set_state(self.head, seq.slot, snapshot.head)):
                llama.llama_memory_seq_rm(self.head_memory, seq.slot, -1, -1)
            llama.llama_memory_seq_rm(self.head_memory, seq.slot, length, -1)
            seq.hidden = snapshot.hidden if length == snapshot.length else None

    def snapshot_bytes(self, snapshot: _Snapshot) -> int:
        return len(snapshot.state) + len(snapshot.head) + (snapshot.hidden.nbytes if snapshot.hidden is not None else 0)

    def save(self, snapshot: _Snapshot) -> dict[str, mx.array]:
        arrays = {"state": mx.array(np.frombuffer(snapshot.state, np.uint8)), "length": mx.array(snapshot.length)}
        if snapshot.head:
            arrays["head"] = mx.array(np.frombuffer(snapshot.head, np.uint8))
        if snapshot.hidden is not None:
            arrays["hidden"] = mx.array(snapshot.hidden)
        return arrays

    def load(self, arrays: dict[str, mx.array]) -> _Snapshot:
        try:
            state, length = arrays["state"], int(arrays["length"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"not a llama.cpp state ({e})") from None
        head, hidden = arrays.get("head", mx.array(np.zeros(0, np.uint8))), arrays.get("hidden")
        if (
            set(arrays) - {"state", "length", "head", "hidden"}
            or not (_bytes_array(state) and _bytes_array(head))
            or (hidden is not None and hidden.shape != (self.width,))
        ):
            raise ValueError("not a llama.cpp state")
        return _Snapshot(_bytes(state), length, _bytes(head), None if hidden is None else np.array(hidden, np.float32))

    def settle(self) -> None:
        pass  # llama.cpp's calls return when their work is done

    def peak_memory(self) -> int:
        """The process's peak resident memory: llama.cpp's buffers and the mapped weights it has read."""
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024

    # --- the context ------------------------------------------------------------------

    def _decode(self, feeds: list[tuple[_Sequence, list[int]]], logits: bool) -> mx.array | None:
        """Evaluate each sequence's tokens in one batch; with `logits`, those after every token
        [B, T, vocab] (all sequences feed the same number T)."""
        batch, i = self.batch, 0
        for seq, tokens in feeds:
            for j, token in enumerate(tokens):
                batch.token[i] = token
                batch.pos[i] = seq.length + j
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = seq.slot
                batch.logits[i] = logits
                i += 1
        batch.n_tokens = i
        code = llama.llama_decode(self.ctx, batch)
        if code != 0:
            raise RuntimeError(f"llama.cpp could not evaluate {i} tokens (llama_decode returned {code})")
        for seq, tokens in feeds:
            seq.length += len(tokens)
        if self.head:  # the head reads each token with the target's hidden state after the one before
            hidden = np.ctypeslib.as_array(llama_cpp_ext.llama_get_embeddings_nextn(self.ctx), shape=(i, self.width))
            rows = iter(hidden.copy())
            for seq, tokens in feeds:
                for token in tokens:
                    if seq.hidden is not None:
                        seq.unread.append((token, seq.hidden))
                    seq.hidden = next(rows)
        if not logits:
            return None
        out = np.empty((i, self.vocab_size), np.float32)
        for row in range(i):  # copied before the next decode overwrites them
            out[row] = np.ctypeslib.as_array(llama.llama_get_logits_ith(self.ctx, row), shape=(self.vocab_size,))
        return mx.array(out.reshape(len(feeds), -1, self.vocab_size))

    # --- the MTP head's context ----------------------------------------------------------

    def _unread(self, seqs: Sequence[_Sequence]) -> list[tuple[int, int, int, np.ndarray, bool]]:
        """The head's rows (slot, position, token, hidden state, logits?) for what `seqs` fed since it last read."""
        rows = []
        for seq in seqs:
            start = seq.length - len(seq.unread)
            rows += [(seq.slot, start + j, token, h, False) for j, (token, h) in enumerate(seq.unread)]
            seq.unread.clear()
        return rows

    def catch_up(self, seqs: Sequence[_Sequence]) -> None:
        if self.head and seqs:
            self._head_decode(self._unread(seqs))

    def _head_decode(self, rows: list[tuple[int, int, int, np.ndarray, bool]]) -> tuple[np.ndarray, np.ndarray]:
        """Run the head on `rows` (slot, position, token, the hidden state it is paired with, logits?), in
        order; the logits and the head's own hidden states (after its norm) of the rows marked."""
        batch, logits, hidden = self.head_batch, [], []
        for start in range(0, len(rows), PREFILL_CHUNK):
            chunk = rows[start : start + PREFILL_CHUNK]
            llama.llama_batch_ext_clear(batch)
            for slot, pos, token, h, output in chunk:
                i = llama.llama_batch_ext_add_token(batch, slot, token)
                llama.llama_batch_ext_set_pos(batch, i, ctypes.byref(llama.llama_pos(pos)))
                llama.llama_batch_ext_set_embd_token(batch, i, llama.llama_embd(h.ctypes.data_as(_FLOATS), 1, h.size))
                llama.llama_batch_ext_set_output_logits(batch, i, output)
            code = llama.llama_process(self.head, llama.LLAMA_PROCESS_TYPE_DECODE, batch)
            if code != 0:
                raise RuntimeError(f"llama.cpp's MTP head could not evaluate {len(chunk)} tokens (returned {code})")
            states = np.ctypeslib.as_array(
                llama_cpp_ext.llama_get_embeddings_nextn(self.head), shape=(len(chunk), self.width)
            )
            for i, row in enumerate(chunk):
                if row[4]:  # copied before the next chunk overwrites them
                    logits.append(
                        np.ctypeslib.as_array(llama.llama_get_logits_ith(self.head, i), shape=(self.vocab_size,)).copy()
                    )
                    hidden.append(states[i].copy())
        return np.array(logits), np.array(hidden)


def _reason() -> str:
    return _errors[0].split(": ", 1)[-1] if _errors else "see the mlxqwen.llama_cpp log"


def _free(model: Any, ctx: Any, batch: Any, head: Any, head_batch: Any) -> None:
    if head:
        llama.llama_batch_ext_free(head_batch)
        llama.llama_free(head)
    llama.llama_batch_free(batch)
    llama.llama_free(ctx)
    llama.llama_model_free(model)


def _copy_state(ctx: Any, slot: int) -> bytes:
    size = llama.llama_state_seq_get_size_ext(ctx, slot, 0)
    data = (ctypes.c_uint8 * size)()
    if llama.llama_state_seq_get_data_ext(ctx, data, size, slot, 0) != size:
        raise RuntimeError("llama.cpp could not copy a sequence's state")
    return bytes(data)


def _set_state(ctx: Any, slot: int, data: bytes) -> bool:
    buffer = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
    return llama.llama_state_seq_set_data_ext(ctx, buffer, len(data), slot, 0) == len(data)


def _bytes_array(a: Any) -> bool:
    return isinstance(a, mx.array) and a.dtype == mx.uint8 and a.ndim == 1


def _bytes(a: mx.array) -> bytes:
    return bytes(memoryview(np.array(a)))


def _meta(model: Any, key: str) -> str | None:
    size = 256
    while True:
        buf = ctypes.create_string_buffer(size)
        n = llama.llama_model_meta_val_str(model, key.encode(), buf, size)
        if n < 0:
            return None
        if n < size:
            return buf.value.decode()
        size = n + 1


def _sampling(model: Any, path: Path) -> dict[str, Any]:
    """Recommended sampling: the GGUF's general.sampling.* keys (as llama.cpp reads them), else
    a generation_config.json beside the file."""
    keys = {
        "temp": "temperature",
        "top_p": "top_p",
        "top_k": "top_k",
        "min_p": "min_p",
        "penalty_repeat": "repetition_penalty",
    }
    found = {field: _meta(model, f"general.sampling.{key}") for key, field in keys.items()}
    values = {field: int(v) if field == "top_k" else float(v) for field, v in found.items() if v is not None}
    return values or recommended_sampling(read_json(path.parent / "generation_config.json"))


def kv_cache_type(dtype: mx.Dtype | None = None, kv_bits: int | None = None) -> str:
    """llama.cpp's K/V cache type for `load`'s dtype and kv_bits (default f16, llama.cpp's)."""
    if kv_bits is not None and kv_bits not in _KV_BITS:
        raise ValueError(f"kv_bits={kv_bits}: K/V quantization takes 4 or 8 bits")
    if dtype is not None and dtype not in _KV_TYPES:
        raise ValueError(f"dtype={dtype}: llama.cpp's K/V cache takes float32, float16 or bfloat16")
    return _KV_BITS[kv_bits] if kv_bits else _KV_TYPES[dtype or mx.float16]


def _outputs(n_seq_max: int, rollback: int) -> int:
    """Logits one llama_decode call gives: every position of a verify over all sequences. llama.cpp
    sizes its compute and output buffers for this many (n_outputs_max) and aborts on more."""
    return n_seq_max * (rollback + 1)


def sizing(
    path: Path,
    *,
    dtype: mx.Dtype | None = None,
    kv_bits: int | None = None,
    yarn: Yarn | None = None,
    n_seq_max: int = 1,
    rollback: int = 0,
    mtp: bool = True,
) -> memory.Sizing:
    """The memory policy's view of a GGUF model as `load` runs it, from the file's header; with
    `mtp`, its MTP head's context too where the file has a head."""
    model = memory.GGUFModel.read(path)
    head = mtp and model.nextn > 0
    rollback = max(rollback, MAX_DEPTH) if head else rollback
    recurrent = any(model.recurrent)
    return memory.llama_sizing(
        model,
        yarn=yarn,
        kv_type=kv_cache_type(dtype, kv_bits),
        n_seq_max=n_seq_max,
        kv_unified=True,
        n_batch=PREFILL_CHUNK,
        n_ubatch=PREFILL_CHUNK,
        n_outputs=_outputs(n_seq_max, rollback),
        n_rs_seq=rollback if recurrent else 0,
        mtp=head,
    )


def load(
    path: str | Path,
    *,
    dtype: mx.Dtype | None = None,
    max_context: int | None = None,
    kv_bits: int | None = None,
    check_memory: bool = True,
    n_threads: int | None = None,
    rope_scaling: dict[str, Any] | None = None,
    n_seq_max: int = 1,
    rollback: int = 0,
    mtp: bool | str = "auto",
) -> LlamaCppRuntime:
    """Load a GGUF model into llama.cpp (layers on the GPU where llama.cpp was built for one).

    dtype: the K/V cache's type (default float16, llama.cpp's). kv_bits: a K/V cache in
    8-bit (Q8_0) or 4-bit (Q4_0) blocks instead. max_context: tokens of context to allocate,
    shared by all sequences (default: the model's own, at most DEFAULT_CONTEXT, no more than
    fits in memory; checked against memory before llama.cpp reads the model). rope_scaling:
    YaRN context extension (see `mlxqwen.load`). n_threads: CPU threads (default:
    `default_threads`). n_seq_max: sequences at once. rollback: recurrent states kept per
    sequence to undo that many tokens (speculative decoding on Qwen3.5/3.6; with the MTP head,
    at least its MAX_DEPTH guesses). mtp: load the model's multi-token-prediction head, which
    `draft` runs (True: the file must have one; "auto": where it has one; False: never)."""
    path = Path(path).expanduser()
    if mtp not in (True, False, "auto"):
        raise ValueError(f"mtp={mtp!r}: a GGUF carries its MTP head itself; llama.cpp takes True, False or 'auto'")
    yarn, kv_type = parse_yarn(rope_scaling), kv_cache_type(dtype, kv_bits)
    head = mtp is not False and memory.GGUFModel.read(path).nextn > 0
    if mtp is True and not head:
        raise ModelLoadError(
            f"{path}: has no MTP head (nextn layers); load it with mtp=False, or convert a checkpoint "
            "that has one (mtp.* tensors) with mlxqwen convert --to gguf"
        )
    rollback = max(rollback, MAX_DEPTH) if head else rollback
    plan = sizing(path, dtype=dtype, kv_bits=kv_bits, yarn=yarn, n_seq_max=n_seq_max, rollback=rollback, mtp=head)
    context = memory.choose_context(
        plan, requested=max_context, default_cap=DEFAULT_CONTEXT, check_memory=check_memory, where=str(path)
    )
    _errors.clear()
    model = llama.llama_model_load_from_file(str(path).encode(), model_params(load_mtp=head))
    if not model:
        raise ModelLoadError(f"{path}: llama.cpp cannot load this model ({_reason()})")
    rope = (yarn.factor, plan.trained) if yarn else None
    try:
        _errors.clear()
        ctx = _new_context(model, context, kv_type, n_threads, rope, n_seq_max, rollback)
        if not ctx:
            raise ModelLoadError(f"{path}: llama.cpp could not make a context of {context} tokens ({_reason()})")
        head_ctx = _new_context(model, context, kv_type, n_threads, rope, n_seq_max, 0, mtp=True) if head else None
        if head and not head_ctx:
            llama.llama_free(ctx)
            raise ModelLoadError(f"{path}: llama.cpp could not make a context for its MTP head ({_reason()})")
    except BaseException:
        llama.llama_model_free(model)
        raise
    runtime = LlamaCppRuntime(path, model, ctx, head_ctx, context, kv_type, rollback)
    template = runtime.tokenizer.chat_template
    if template is not None:
        template.origin = f"{path} (tokenizer.chat_template)"
        try:
            template.check()
        except ModelLoadError:
            runtime.close()
            raise
    return runtime


def model_params(load_mtp: bool = False) -> Any:
    params = llama.llama_model_default_params()
    params.load_mtp = load_mtp
    # ggml's AMX matmul (built in on CPUs that have AMX) crashes on some quantized models (the
    # demo's Q4_K_M among them); extra buffer types are where it comes in, so skip them there.
    params.use_extra_bufts = b"AMX_INT8 = 1" not in llama.llama_print_system_info()
    return params


def default_threads() -> int:
    """Half the logical cores: about the physical ones, which llama.cpp itself uses. More threads
    than free cores make its spinning workers wait on each other (a prompt then reads several
    times slower)."""
    return max(1, (os.cpu_count() or 1) // 2)


def _new_context(
    model: Any,
    n_ctx: int,
    kv_type: str,
    n_threads: int | None,
    yarn: tuple[float, int] | None,
    n_seq_max: int,
    rollback: int,
    mtp: bool = False,
) -> Any:
    """A context as `sizing` describes it, or with `mtp` one that runs the model's MTP head.
    yarn: (factor, trained context) of YaRN rope scaling."""
    params = llama.llama_context_default_params()
    if mtp:
        params.ctx_type = llama.LLAMA_CONTEXT_TYPE_MTP
    params.n_ctx = n_ctx
    params.n_batch = params.n_ubatch = PREFILL_CHUNK
    params.n_seq_max = n_seq_max
    params.n_outputs_max = _outputs(n_seq_max, rollback)
    params.n_rs_seq = rollback
    params.kv_unified = True  # one pool of n_ctx cells: any sequence may grow to all of it
    params.n_threads = params.n_threads_batch = n_threads or default_threads()
    params.type_k = params.type_v = _GGML_TYPES[kv_type]
    # llama.cpp's flash attention computes in float16 on a CPU: a float32 cache asks for float32 attention
    f32 = kv_type == "f32"
    params.flash_attn_type = llama.LLAMA_FLASH_ATTN_TYPE_DISABLED if f32 else llama.LLAMA_FLASH_ATTN_TYPE_AUTO
    if yarn is not None:
        factor, trained = yarn
        params.rope_scaling_type = llama.LLAMA_ROPE_SCALING_TYPE_YARN
        params.rope_freq_scale = 1 / factor
        params.yarn_orig_ctx = trained
    params.no_perf = False  # keeps llama.cpp's counts of evaluated tokens (llama_perf_context)
    return llama.llama_init_from_model(model, params)
