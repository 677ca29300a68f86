"""The llama.cpp backend: a GGUF model run by llama.cpp (through llama-cpp-python's C API)
behind the same engine as MLX, so `generate`, `stream`, `chat`, the CLI and the TUI work
the same. llama.cpp computes the logits; sampling, stop strings, parsing and stats are the
engine's. The GGUF's own tokenizer and chat template are used.

One llama.cpp context holds one sequence. Each engine cache (`new_cache`) is a `_Sequence`
that knows how many tokens llama.cpp holds for it; only the cache in use lives in the
context. When another cache is used, the previous one's state is copied out to host memory
and copied back when it is used again (nothing recomputed), so independent generations and
chats can share the model.

Snapshots (a chat's turn boundaries) never recompute either. A K/V cache is cut back to a
length with `llama_memory_seq_rm`. The Gated DeltaNet layers of Qwen3.5/3.6 keep a
recurrent state that cannot be cut back: llama.cpp refuses a partial `seq_rm` on them, so
llama-cpp-python's `Llama` re-reads the whole conversation every turn on these models
(benchmarks/bench_llama.py counts it). Their snapshot therefore also copies that state out, with
`llama_state_seq_get_data_ext(..., LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY)` (only the recurrent
part, a fixed size: about 150 MB for Qwen3.6-27B); restoring writes it back, then cuts the
K/V cache to the snapshot's length."""

from __future__ import annotations

import ctypes
import logging
import os
import resource
import sys
import threading
import weakref
from functools import cached_property
from pathlib import Path
from typing import Any

import llama_cpp as llama
import mlx.core as mx
import numpy as np

from .. import memory
from ..chat_template import ChatTemplate
from ..checkpoint import read_json
from ..engine import Backend, GenerationOptions
from ..errors import InsufficientMemoryError, ModelLoadError
from ..sampling import recommended_sampling
from ..tokenizer import Tokenizer

PREFILL_CHUNK = 512  # tokens per llama_decode call while reading a prompt
DEFAULT_CONTEXT = 32768  # llama.cpp allocates the whole K/V cache up front, so the default stays modest
_WORKING = memory.GiB  # llama.cpp's compute buffers, the logits, the tokenizer, the runtime
_PARTIAL = llama.LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY
_SEQ = 0  # the context's one sequence

# K/V cache types: the compute dtype's (as MLX's `dtype`), or 8/4-bit blocks (`kv_bits`); bytes per value
_GGML_BF16 = 30
_KV_TYPES = {mx.float32: llama.GGML_TYPE_F32, mx.float16: llama.GGML_TYPE_F16, mx.bfloat16: _GGML_BF16}
_KV_BITS = {8: llama.GGML_TYPE_Q8_0, 4: llama.GGML_TYPE_Q4_0}
_VALUE_BYTES = {
    llama.GGML_TYPE_F32: 4.0,
    llama.GGML_TYPE_F16: 2.0,
    _GGML_BF16: 2.0,
    llama.GGML_TYPE_Q8_0: 34 / 32,
    llama.GGML_TYPE_Q4_0: 18 / 32,
}

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
    """The engine's cache on this backend: the number of tokens llama.cpp holds for it, and
    its state while another cache uses the context."""

    def __init__(self) -> None:
        self.length = 0
        self.parked: ctypes.Array | None = None


class LlamaCpp(Backend):
    """A GGUF model in llama.cpp; see `load`."""

    name = "llama.cpp"

    def __init__(self, path: Path, model: Any, ctx: Any, max_context: int, prefill_chunk: int):
        """Takes `model` and `ctx` (its context, from `_new_context`) over: they are freed with it."""
        self.path = path
        self.model = model
        self.ctx = ctx
        self.batch = llama.llama_batch_init(prefill_chunk, 0, 1)
        self._free = weakref.finalize(self, _free, model, ctx, self.batch)
        self.memory = llama.llama_get_memory(ctx)
        self.max_context = max_context
        self.prefill_chunk = prefill_chunk
        self.recurrent = llama.llama_model_is_hybrid(model) or llama.llama_model_is_recurrent(model)
        for i in range(prefill_chunk):
            self.batch.n_seq_id[i] = 1
            self.batch.seq_id[i][0] = _SEQ

        vocab = _Vocab(llama.llama_model_get_vocab(model))
        self.n_vocab = vocab.vocab_size
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
        self._lock = threading.Lock()  # one context: calls from several threads take turns
        self._owner: weakref.ref[_Sequence] | None = None

    def close(self) -> None:
        """Free the model and its context now, between generations (else when it is collected)."""
        self._free()

    # --- the engine's token-level interface -----------------------------------------

    def new_cache(self) -> _Sequence:
        return _Sequence()

    def prefill(self, cache: _Sequence, tokens: list[int]) -> None:
        with self._lock:
            self._use(cache)
            for i in range(0, len(tokens), self.prefill_chunk):
                self._decode(cache, tokens[i : i + self.prefill_chunk], logits=False)

    def forward(self, cache: _Sequence, tokens: mx.array) -> mx.array:
        ids = tokens.tolist()  # waits for the engine's draw of the token
        with self._lock:
            self._use(cache)
            self._decode(cache, ids, logits=True)
            logits = llama.llama_get_logits_ith(self.ctx, -1)
            return mx.array(np.ctypeslib.as_array(logits, shape=(self.n_vocab,)))  # copied before the next decode

    def snapshot(self, cache: _Sequence) -> tuple[int, ctypes.Array | None]:
        with self._lock:
            self._use(cache)
            recurrent = self._state(_PARTIAL) if self.recurrent and cache.length else None
            return cache.length, recurrent

    def restore(self, cache: _Sequence, snapshot: tuple[int, ctypes.Array | None]) -> None:
        length, recurrent = snapshot
        with self._lock:
            self._use(cache)
            if recurrent is not None:
                self._set_state(recurrent, _PARTIAL)
            # with the recurrent state back at `length`, only K/V past it are left to remove
            if not llama.llama_memory_seq_rm(self.memory, _SEQ, length, -1):
                raise RuntimeError(f"llama.cpp could not cut the cache back to {length} tokens")
            cache.length = length

    def settle(self, cache: _Sequence) -> None:
        pass  # llama.cpp's calls return when their work is done

    def peak_memory(self) -> int:
        """The process's peak resident memory: llama.cpp's buffers and the mapped weights it has read."""
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024

    # --- the context ------------------------------------------------------------------

    def _use(self, cache: _Sequence) -> None:
        """Make `cache` the sequence in the context, parking the one that was there."""
        owner = self._owner() if self._owner is not None else None
        if owner is cache:
            return
        if owner is not None and owner.length:
            owner.parked = self._state(0)
        llama.llama_memory_clear(self.memory, False)
        if cache.parked is not None:
            self._set_state(cache.parked, 0)
            cache.parked = None
        self._owner = weakref.ref(cache)

    def _decode(self, cache: _Sequence, tokens: list[int], logits: bool) -> None:
        batch = self.batch
        batch.n_tokens = len(tokens)
        for i, token in enumerate(tokens):
            batch.token[i] = token
            batch.pos[i] = cache.length + i
            batch.logits[i] = False
        batch.logits[len(tokens) - 1] = logits
        code = llama.llama_decode(self.ctx, batch)
        if code != 0:
            raise RuntimeError(f"llama.cpp could not evaluate {len(tokens)} tokens (llama_decode returned {code})")
        cache.length += len(tokens)

    def _state(self, flags: int) -> ctypes.Array:
        size = llama.llama_state_seq_get_size_ext(self.ctx, _SEQ, flags)
        data = (ctypes.c_uint8 * size)()
        if llama.llama_state_seq_get_data_ext(self.ctx, data, size, _SEQ, flags) != size:
            raise RuntimeError("llama.cpp could not copy the sequence's state")
        return data

    def _set_state(self, data: ctypes.Array, flags: int) -> None:
        if llama.llama_state_seq_set_data_ext(self.ctx, data, len(data), _SEQ, flags) != len(data):
            raise RuntimeError("llama.cpp could not restore the sequence's state")


def _reason() -> str:
    return _errors[0].split(": ", 1)[-1] if _errors else "see the mlxqwen.llama_cpp log"


def _free(model: Any, ctx: Any, batch: Any) -> None:
    llama.llama_batch_free(batch)
    llama.llama_free(ctx)
    llama.llama_model_free(model)


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


def _kv_bytes_per_token(model: Any, kv_type: int) -> float:
    arch = _meta(model, "general.architecture")
    layers = llama.llama_model_n_layer(model)
    if llama.llama_model_is_hybrid(model):  # Qwen3.5/3.6: one full-attention layer in 4
        layers //= int(_meta(model, f"{arch}.full_attention_interval") or 4)
    head = llama.llama_model_n_embd(model) // llama.llama_model_n_head(model)
    k = int(_meta(model, f"{arch}.attention.key_length") or head)
    v = int(_meta(model, f"{arch}.attention.value_length") or head)
    return layers * llama.llama_model_n_head_kv(model) * (k + v) * _VALUE_BYTES[kv_type]


def _estimate(model: Any, context: int, kv_type: int) -> memory.MemoryEstimate:
    return memory.MemoryEstimate(
        context=context,
        weights=llama.llama_model_size(model),
        kv_cache=int(-(-context // 256) * 256 * _kv_bytes_per_token(model, kv_type)),
        recurrent_state=0,  # within the working allowance (Qwen3.6-27B's: about 150 MB)
        working=_WORKING,
        budget=memory.memory_budget(),
    )


def _context(model: Any, path: Path, max_context: int | None, kv_type: int, check_memory: bool) -> int:
    """The context to allocate: `max_context`, checked; by default the model's own, at most
    DEFAULT_CONTEXT, and no more than fits in memory."""
    trained = llama.llama_model_n_ctx_train(model)
    if max_context is not None:
        plan = _estimate(model, max_context, kv_type)
        if check_memory and not plan.fits:
            raise InsufficientMemoryError(f"{path}: at max_context={max_context} the model {plan.verdict}")
        return max_context
    context = min(trained, DEFAULT_CONTEXT)
    if not check_memory:
        return context
    plan = _estimate(model, 0, kv_type)
    fits = int((plan.budget - plan.total) / _kv_bytes_per_token(model, kv_type)) // 256 * 256
    if fits < min(4096, context):
        plan = _estimate(model, min(4096, context), kv_type)
        raise InsufficientMemoryError(f"{path}: {plan.verdict}; use a smaller or more quantized model")
    return min(context, fits)


def load(
    path: str | Path,
    *,
    dtype: mx.Dtype | None = None,
    max_context: int | None = None,
    kv_bits: int | None = None,
    check_memory: bool = True,
    n_threads: int | None = None,
) -> LlamaCpp:
    """Load a GGUF model into llama.cpp (layers on the GPU where llama.cpp was built for one).

    dtype: the K/V cache's type (default float16, llama.cpp's). kv_bits: a K/V cache in
    8-bit (Q8_0) or 4-bit (Q4_0) blocks instead. max_context: tokens of context to allocate
    (default: the model's own, at most DEFAULT_CONTEXT, no more than fits in memory).
    n_threads: CPU threads (default: `default_threads`)."""
    path = Path(path).expanduser()
    if kv_bits is not None and kv_bits not in _KV_BITS:
        raise ValueError(f"kv_bits={kv_bits}: K/V quantization takes 4 or 8 bits")
    if dtype is not None and dtype not in _KV_TYPES:
        raise ValueError(f"dtype={dtype}: llama.cpp's K/V cache takes float32, float16 or bfloat16")
    kv_type = _KV_BITS[kv_bits] if kv_bits else _KV_TYPES[dtype or mx.float16]
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ModelLoadError(f"{path}: cannot be read ({e.strerror})") from None
    if magic != b"GGUF":
        raise ModelLoadError(f"{path}: not a GGUF file")
    _errors.clear()
    model = llama.llama_model_load_from_file(str(path).encode(), model_params())
    if not model:
        raise ModelLoadError(f"{path}: llama.cpp cannot load this model ({_reason()})")
    try:
        context = _context(model, path, max_context, kv_type, check_memory)
        _errors.clear()
        ctx = _new_context(model, context, kv_type, n_threads, PREFILL_CHUNK)
    except BaseException:
        llama.llama_model_free(model)
        raise
    if not ctx:
        llama.llama_model_free(model)
        raise ModelLoadError(f"{path}: llama.cpp could not make a context of {context} tokens ({_reason()})")
    return LlamaCpp(path, model, ctx, context, PREFILL_CHUNK)


def model_params() -> Any:
    params = llama.llama_model_default_params()
    # ggml's AMX matmul (built in on CPUs that have AMX) crashes on some quantized models (the
    # demo's Q4_K_M among them); extra buffer types are where it comes in, so skip them there.
    params.use_extra_bufts = b"AMX_INT8 = 1" not in llama.llama_print_system_info()
    return params


def default_threads() -> int:
    """Half the logical cores: about the physical ones, which llama.cpp itself uses. More threads
    than free cores make its spinning workers wait on each other (a prompt then reads several
    times slower)."""
    return max(1, (os.cpu_count() or 1) // 2)


def _new_context(model: Any, n_ctx: int, kv_type: int, n_threads: int | None, n_batch: int) -> Any:
    params = llama.llama_context_default_params()
    params.n_ctx = n_ctx
    params.n_batch = params.n_ubatch = n_batch
    params.n_seq_max = 1
    params.n_threads = params.n_threads_batch = n_threads or default_threads()
    params.type_k = params.type_v = kv_type
    # llama.cpp's flash attention computes in float16 on a CPU: a float32 cache asks for float32 attention
    f32 = kv_type == llama.GGML_TYPE_F32
    params.flash_attn_type = llama.LLAMA_FLASH_ATTN_TYPE_DISABLED if f32 else llama.LLAMA_FLASH_ATTN_TYPE_AUTO
    params.no_perf = False  # keeps llama.cpp's counts of evaluated tokens (llama_perf_context)
    return llama.llama_init_from_model(model, params)
