"""`mlxqwen eval MODEL --against SRC`: the conversion's quality report for any two models, each an
MLX directory (quantized or not), a Hugging Face directory or a GGUF file (run by llama.cpp).

Both read the same tokens: the report's held-out text (or `--text FILE`) in the tokenizer of the
first of SRC and MODEL that is a directory (a GGUF's own tokenizer if both are GGUF files). MLX
models run one layer at a time, as in the conversion's report, so a source larger than memory
can be measured; a GGUF runs in llama.cpp with every position's logits kept."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
from rich.progress import Progress

from mlxqwen.backends import INSTALL_LLAMA, llama_cpp_installed
from mlxqwen.checkpoint import gguf_file, has_weights, is_gguf
from mlxqwen.errors import ConvertError
from mlxqwen.library import resolve_model
from mlxqwen.loader import default_dtype, load_model
from mlxqwen.tokenizer import Tokenizer

from .calibration import TEXT, check_tokens, user_text
from .progress import add_task
from .quality import Quality, compare, layerwise_logits


def evaluate_models(
    model: str | Path, against: str | Path, text: str | Path | None = None, progress: Progress | None = None
) -> Quality:
    paths = [resolve_model(str(p)) for p in (against, model)]
    ggufs = [_gguf(p) for p in paths]
    if any(ggufs) and not llama_cpp_installed():
        raise ConvertError(
            f"{next(g for g in ggufs if g)}: running a GGUF needs llama.cpp; install it with {INSTALL_LLAMA}"
        )
    words = user_text(text, "text") if text else TEXT
    directory = next((p for p, g in zip(paths, ggufs, strict=True) if not g), None)
    if directory is not None:
        tokens = Tokenizer.from_dir(directory).encode(words)
    else:
        tokens = _gguf_tokens(ggufs[0], words)
    logits = [
        _logits(p, g, tokens, progress, label) for p, g, label in zip(paths, ggufs, ("source", "model"), strict=True)
    ]
    return compare(logits[0], logits[1], tokens)


def _gguf(path: Path) -> Path | None:
    """The GGUF that `path` is, or that a directory without MLX or Hugging Face weights holds."""
    if path.is_file():
        return path if is_gguf(path) else None
    return None if has_weights(path) else gguf_file(path)


def _logits(path: Path, gguf: Path | None, tokens: list[int], progress: Progress | None, label: str) -> mx.array:
    if gguf is not None:
        return gguf_logits(gguf, tokens, progress, f"eval: {label} (llama.cpp)")
    model, cfg = load_model(path, dtype=default_dtype(), lazy=True)
    check_tokens(tokens, path, cfg.vocab_size)
    return layerwise_logits(model, tokens, progress, f"eval: {label}")


def _gguf_tokens(path: Path, words: str) -> list[int]:
    """`words` in the tokenizer of the GGUF at `path`, as llama.cpp reads them."""
    import llama_cpp

    llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    return llm.tokenize(words.encode(), add_bos=False, special=True)


def gguf_logits(path: Path, tokens: list[int], progress: Progress | None = None, label: str = "eval") -> mx.array:
    """Logits [T, V] of the GGUF at `path` at every position of `tokens`, in llama.cpp, loaded as
    mlxqwen's llama.cpp runtime loads it (`model_params`: on CPUs with AMX, not through ggml's
    AMX matmul, which crashes there), with an fp32 K/V cache so that the report measures the
    weights alone."""
    import llama_cpp as llama

    from mlxqwen.backends.llama_cpp import PREFILL_CHUNK, default_threads, model_params

    model = llama.llama_model_load_from_file(str(path).encode(), model_params())
    if not model:
        raise ConvertError(f"{path}: llama.cpp cannot load this model")
    params = llama.llama_context_default_params()
    params.n_ctx = -(-len(tokens) // 256) * 256
    params.n_batch = params.n_ubatch = PREFILL_CHUNK
    params.n_threads = params.n_threads_batch = default_threads()
    params.type_k = params.type_v = llama.GGML_TYPE_F32
    params.flash_attn_type = llama.LLAMA_FLASH_ATTN_TYPE_DISABLED  # on a CPU it would compute in float16
    ctx = llama.llama_init_from_model(model, params)
    batch = llama.llama_batch_init(PREFILL_CHUNK, 0, 1)
    try:
        if not ctx:
            raise ConvertError(f"{path}: llama.cpp could not make a context of {len(tokens)} tokens")
        vocab = llama.llama_vocab_n_tokens(llama.llama_model_get_vocab(model))
        if max(tokens) >= vocab:
            raise ConvertError(f"{path}: token id {max(tokens)} is outside its vocabulary ({vocab})")
        task = add_task(progress, label, len(tokens)) if progress is not None else None
        logits = np.empty((len(tokens), vocab), np.float32)
        for start in range(0, len(tokens), PREFILL_CHUNK):
            chunk = tokens[start : start + PREFILL_CHUNK]
            for i, token in enumerate(chunk):
                batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, start + i, 1, True
                batch.seq_id[i][0] = 0
            batch.n_tokens = len(chunk)
            if llama.llama_decode(ctx, batch) != 0:
                raise ConvertError(f"{path}: llama.cpp could not evaluate tokens {start}-{start + len(chunk)}")
            logits[start : start + len(chunk)] = np.ctypeslib.as_array(
                llama.llama_get_logits(ctx), shape=(len(chunk), vocab)
            )
            if task is not None:
                progress.update(task, completed=start + len(chunk))
    finally:
        llama.llama_batch_free(batch)
        if ctx:
            llama.llama_free(ctx)
        llama.llama_model_free(model)
    return mx.array(logits)
