"""Which runtime runs a model: MLX on Apple Silicon, llama.cpp on GGUF weights elsewhere.

`choose` resolves `mlxqwen.load(path, backend=...)`:
- "mlx": the model directory through MLX (on a CPU when not on Apple Silicon: correct, but
  slow: MLX's CPU backend reads weights at a fraction of llama.cpp's speed).
- "llama.cpp": a GGUF file, or the GGUF file in a directory.
- "auto": a GGUF file runs on llama.cpp anywhere. A directory runs on MLX on Apple Silicon;
  elsewhere on llama.cpp when it holds GGUF weights (the demo model ships them), else on MLX,
  with a note that gives the one command that writes them. Nothing is converted implicitly:
  a GGUF export takes minutes and as much disk as the model, which a user should decide to
  spend. Notes are logged (`mlxqwen.notes`) once the model has loaded, never before an error."""

from __future__ import annotations

import importlib.util
import logging
import platform
import shlex
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from ..checkpoint import gguf_file
from ..engine import Backend
from ..errors import ModelLoadError
from ..library import resolve_model

BACKENDS = ("auto", "mlx", "llama.cpp")
INSTALL_LLAMA = "pip install 'mlxqwen[llama]'"

logger = logging.getLogger("mlxqwen")


@dataclass(frozen=True)
class Choice:
    backend: str  # "mlx" or "llama.cpp"
    path: Path  # what that backend loads: the model directory or the GGUF file
    note: str | None = None  # advice for the user: how to run this model faster


def apple_silicon() -> bool:
    return platform.system() == "Darwin" and platform.machine() == "arm64"


def llama_cpp_installed() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def convert_command(directory: Path, quant: str = "Q4_K_M") -> str:
    """The command that writes GGUF weights into the model directory, where `auto` finds them."""
    out = directory / f"{directory.name}-{quant}.gguf"
    return f"mlxqwen convert {shlex.quote(str(directory))} --to gguf --quant {quant} -o {shlex.quote(str(out))}"


def choose(path: Path, backend: str = "auto") -> Choice:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: choose one of {', '.join(BACKENDS)}")
    if not path.exists():
        raise ModelLoadError(f"{path}: not a model directory or GGUF file")
    gguf = gguf_file(path)
    if backend == "mlx" or (backend == "auto" and path.is_dir() and apple_silicon() and _mlx_dir(path)):
        if path.is_file():
            raise ModelLoadError(f"{path}: MLX runs model directories; run a GGUF file with backend 'llama.cpp'")
        return Choice("mlx", path)
    if backend == "llama.cpp" or gguf is not None:
        if gguf is None:
            raise ModelLoadError(f"{path}: no GGUF weights for llama.cpp; write them with: {convert_command(path)}")
        if llama_cpp_installed():
            return Choice("llama.cpp", gguf)
        if backend == "llama.cpp" or not _mlx_dir(path):
            raise ModelLoadError(f"{gguf}: GGUF models run on llama.cpp; install it with {INSTALL_LLAMA}")
        note = f"{path.name}: llama.cpp would run its {gguf.name} faster than MLX on this CPU; {INSTALL_LLAMA}"
        return Choice("mlx", path, note)
    if apple_silicon() or not _mlx_dir(path):
        return Choice("mlx", path)
    install = "" if llama_cpp_installed() else f"{INSTALL_LLAMA}, then "
    note = f"{path.name}: MLX runs on the CPU here, slowly; for llama.cpp's speed, {install}run {convert_command(path)}"
    return Choice("mlx", path, note)


def _mlx_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def load(
    path: str | Path,
    dtype: mx.Dtype | None = None,
    lazy: bool = False,
    *,
    backend: str = "auto",
    max_context: int | None = None,
    kv_bits: int | None = None,
    check_memory: bool = True,
) -> Backend:
    """Load a model: a Hugging Face or MLX-quantized Qwen checkpoint directory, a GGUF file, or
    the name of a local model as `mlxqwen list` shows it ("mlxqwen-demo").

    backend: "mlx", "llama.cpp", or "auto": MLX on Apple Silicon, elsewhere llama.cpp for a
        model with GGUF weights (see `mlxqwen.backends`); `llm.name` says which runs.
    dtype: compute dtype of unquantized weights (default: bf16 on a GPU, fp32 on a CPU); on
        llama.cpp, the K/V cache's type (default float16).
    lazy: leave weights memory-mapped until first use instead of reading them now (llama.cpp
        always maps them).
    max_context: longest conversation in tokens (default: the longest that fits in memory,
        at most the model's own; on llama.cpp, which allocates it up front, at most 32,768).
    kv_bits: keep the K/V cache in 8 or 4 bits (less memory for long contexts).
    check_memory: refuse, before reading any weight, a model and context that would not fit
        in this machine's memory (see `mlxqwen.memory`).
    """
    choice = choose(resolve_model(path), backend)
    if choice.backend == "llama.cpp":
        from . import llama_cpp

        llm = llama_cpp.load(
            choice.path, dtype=dtype, max_context=max_context, kv_bits=kv_bits, check_memory=check_memory
        )
    else:
        from . import mlx

        llm = mlx.load(
            choice.path, dtype=dtype, lazy=lazy, max_context=max_context, kv_bits=kv_bits, check_memory=check_memory
        )
    if choice.note:
        logger.warning(choice.note)
    return llm
