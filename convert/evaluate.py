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
        tokens = _llama(ggufs[0], 0).tokenize(words.encode(), add_bos=False, special=True)
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


def _llama(path: Path, context: int):
    """llama.cpp on the GGUF at `path` (only its vocabulary when `context` is 0), with an fp32 K/V
    cache so that the report measures the weights alone."""
    import llama_cpp

    f32 = llama_cpp.GGML_TYPE_F32
    return llama_cpp.Llama(
        str(path),
        n_ctx=-(-max(context, 1) // 256) * 256,
        logits_all=True,
        vocab_only=context == 0,
        type_k=f32,
        type_v=f32,
        verbose=False,
    )


def gguf_logits(path: Path, tokens: list[int], progress: Progress | None = None, label: str = "eval") -> mx.array:
    """Logits [T, V] of the GGUF at `path` at every position of `tokens`, in llama.cpp."""
    llm = _llama(path, len(tokens))
    if max(tokens) >= llm.n_vocab():
        raise ConvertError(f"{path}: token id {max(tokens)} is outside its vocabulary ({llm.n_vocab()})")
    task = add_task(progress, label, len(tokens)) if progress is not None else None
    step = llm.n_batch
    for start in range(0, len(tokens), step):
        llm.eval(tokens[start : start + step])
        if task is not None:
            progress.update(task, completed=min(start + step, len(tokens)))
    return mx.array(np.array(llm.scores[: len(tokens)], dtype=np.float32))
