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
taken at turn boundaries instead."""

from __future__ import annotations

import ctypes
import logging
import os
import resource
import sys
import weakref
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import llama_cpp as llama
import mlx.core as mx
import numpy as np

from .. import memory
from ..chat_template import ChatTemplate
from ..checkpoint import read_json
from ..config import Yarn, parse_yarn
from ..errors import ModelLoadError
from ..sampling import GenerationOptions, recommended_sampling
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


class LlamaCppRuntime(Runtime):
    """A GGUF model in llama.cpp; see `load`."""

    name = "llama.cpp"
    config = None

    def __init__(self, path: Path, model: Any, ctx: Any, n_ctx: int, kv_type: int, rollback: int):
        """Takes `model` and `ctx` (its context, from `_new_context`) over: they are freed with it."""
        self.path = path
        self.model = model
        self.ctx = ctx
        self.slots = llama.llama_n_seq_max(ctx)
        self.batch = llama.llama_batch_init(max(PREFILL_CHUNK, self.slots * (rollback + 1)), 0, 1)
        self._free = weakref.finalize(self, _free, model, ctx, self.batch)
        self._free.atexit = False  # the process's end frees it; llama.cpp may be torn down first
        self.memory = llama.llama_get_memory(ctx)
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
        self._free_slots.append(seq.slot)

    def prefill(self, seq: _Sequence, tokens: list[int]) -> None:
        self._decode([(seq, tokens)], logits=False)

    def decode(self, seqs: Sequence[_Sequence], tokens: mx.array) -> mx.array:
        ids = tokens.tolist()  # waits for the engine's draws
        return self._decode([(seq, [t]) for seq, t in zip(seqs, ids, strict=True)], logits=True)[:, 0]

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

    def snapshot(self, seq: _Sequence) -> tuple[bytes, int]:
        size = llama.llama_state_seq_get_size_ext(self.ctx, seq.slot, 0)
        data = (ctypes.c_uint8 * size)()
        if llama.llama_state_seq_get_data_ext(self.ctx, data, size, seq.slot, 0) != size:
            raise RuntimeError("llama.cpp could not copy a sequence's state")
        return bytes(data), seq.length

    def restore(self, seq: _Sequence, snapshot: tuple[bytes, int], length: int) -> None:
        data, _ = snapshot
        buffer = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        if llama.llama_state_seq_set_data_ext(self.ctx, buffer, len(data), seq.slot, 0) != len(data):
            llama.llama_memory_seq_rm(self.memory, seq.slot, -1, -1)
            raise ValueError("llama.cpp refused a saved state")
        if not llama.llama_memory_seq_rm(self.memory, seq.slot, length, -1):
            raise RuntimeError(f"llama.cpp could not cut a sequence back to {length} tokens")
        seq.length = length

    def snapshot_bytes(self, snapshot: tuple[bytes, int]) -> int:
        return len(snapshot[0])

    def save(self, snapshot: tuple[bytes, int]) -> dict[str, mx.array]:
        data, length = snapshot
        return {"state": mx.array(np.frombuffer(data, np.uint8)), "length": mx.array(length)}

    def load(self, arrays: dict[str, mx.array]) -> tuple[bytes, int]:
        try:
            state, length = arrays["state"], int(arrays["length"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"not a llama.cpp state ({e})") from None
        if state.dtype != mx.uint8 or state.ndim != 1 or len(arrays) != 2:
            raise ValueError("not a llama.cpp state")
        return bytes(memoryview(np.array(state))), length

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
        if not logits:
            return None
        out = np.empty((i, self.vocab_size), np.float32)
        for row in range(i):  # copied before the next decode overwrites them
            out[row] = np.ctypeslib.as_array(llama.llama_get_logits_ith(self.ctx, row), shape=(self.vocab_size,))
        return mx.array(out.reshape(len(feeds), -1, self.vocab_size))


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
) -> memory.Sizing:
    """The memory policy's view of a GGUF model as `load` runs it, from the file's header."""
    return memory.llama_sizing(
        memory.GGUFModel.read(path),
        yarn=yarn,
        kv_type=kv_cache_type(dtype, kv_bits),
        n_seq_max=n_seq_max,
        kv_unified=True,
        n_batch=PREFILL_CHUNK,
        n_ubatch=PREFILL_CHUNK,
        n_outputs=_outputs(n_seq_max, rollback),
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
) -> LlamaCppRuntime:
    """Load a GGUF model into llama.cpp (layers on the GPU where llama.cpp was built for one).

    dtype: the K/V cache's type (default float16, llama.cpp's). kv_bits: a K/V cache in
    8-bit (Q8_0) or 4-bit (Q4_0) blocks instead. max_context: tokens of context to allocate,
    shared by all sequences (default: the model's own, at most DEFAULT_CONTEXT, no more than
    fits in memory; checked against memory before llama.cpp reads the model). rope_scaling:
    YaRN context extension (see `mlxqwen.load`). n_threads: CPU threads (default:
    `default_threads`). n_seq_max: sequences at once. rollback: recurrent states kept per
    sequence to undo that many tokens (speculative decoding on Qwen3.5/3.6)."""
    path = Path(path).expanduser()
    yarn, kv_type = parse_yarn(rope_scaling), kv_cache_type(dtype, kv_bits)
    plan = sizing(path, dtype=dtype, kv_bits=kv_bits, yarn=yarn, n_seq_max=n_seq_max, rollback=rollback)
    context = memory.choose_context(
        plan, requested=max_context, default_cap=DEFAULT_CONTEXT, check_memory=check_memory, where=str(path)
    )
    _errors.clear()
    model = llama.llama_model_load_from_file(str(path).encode(), model_params())
    if not model:
        raise ModelLoadError(f"{path}: llama.cpp cannot load this model ({_reason()})")
    rope = (yarn.factor, plan.trained) if yarn else None
    try:
        _errors.clear()
        ctx = _new_context(model, context, kv_type, n_threads, rope, n_seq_max, rollback)
    except BaseException:
        llama.llama_model_free(model)
        raise
    if not ctx:
        llama.llama_model_free(model)
        raise ModelLoadError(f"{path}: llama.cpp could not make a context of {context} tokens ({_reason()})")
    runtime = LlamaCppRuntime(path, model, ctx, context, kv_type, rollback)
    template = runtime.tokenizer.chat_template
    if template is not None:
        template.origin = f"{path} (tokenizer.chat_template)"
        try:
            template.check()
        except ModelLoadError:
            runtime.close()
            raise
    return runtime


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


def _new_context(
    model: Any,
    n_ctx: int,
    kv_type: str,
    n_threads: int | None,
    yarn: tuple[float, int] | None,
    n_seq_max: int,
    rollback: int,
) -> Any:
    """A context as `sizing` describes it. yarn: (factor, trained context) of YaRN rope scaling."""
    params = llama.llama_context_default_params()
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
