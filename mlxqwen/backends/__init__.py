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
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
from platformdirs import user_cache_dir

from .. import memory
from ..checkpoint import gguf_file
from ..config import parse_yarn
from ..errors import ModelLoadError
from ..library import resolve_model
from ..llm import LLM
from ..memory import memory_budget
from ..prefix_cache import PrefixCache
from ..speculative import MAX_DEPTH

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
    rope_scaling: dict[str, Any] | None = None,
    check_memory: bool = True,
    max_concurrent: int = 8,
    max_queue: int = 64,
    prefix_cache: int | bool = True,
    prefix_cache_dir: str | Path | bool | None = None,
    mtp: bool | str | Path = "auto",
    mtp_depth: int | None = None,
    parallel: str = "pipeline",
) -> LLM:
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
        A context past the one the model was trained for is refused unless `rope_scaling`
        extends it.
    kv_bits: keep the K/V cache in 8 or 4 bits (less memory for long contexts).
    rope_scaling: extend the context with YaRN as Qwen documents it, e.g.
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}: the
        model then handles factor x original tokens (original defaults to the model's own).
    check_memory: refuse, before reading any weight, a model and context that would not fit
        in this machine's memory (see `mlxqwen.memory`).
    max_concurrent: sequences generated together; max_queue: requests waiting beyond those
        (more are refused with `QueueFullError`).
    prefix_cache: bytes of memory for model states kept across requests (True: an eighth of
        what this machine allows, at most 4 GiB; False: none, though chats keep their own).
    prefix_cache_dir: also keep them on disk, in this directory (True: the user cache
        directory), so that another process or a restart reuses them.
    mtp: speculative decoding with the model's multi-token-prediction head (Qwen3.5/3.6/3.8):
        "auto" when the checkpoint has one, True (an error if not), False, or the path of a
        head shipped apart. mtp_depth: tokens it guesses per step, 0 to 3 (default: the number
        that pays, measured as it runs; 0 where guessing costs more than it saves).
    parallel: inside `mlx.launch` with several processes (see `mlxqwen.distributed`), how the
        model is split across them: "pipeline" (layers) or "tensor" (heads and columns of every
        layer). There, the MTP head and the prefix cache's disk tier are off; only rank 0 returns
        from `load`: the others make its calls on their part of the model, then end the process.
    """
    if mtp_depth is not None and not 0 <= mtp_depth <= MAX_DEPTH:
        raise ValueError(f"mtp_depth={mtp_depth}: choose 0 to {MAX_DEPTH}")
    choice = choose(resolve_model(path), backend)
    options = dict(max_context=max_context, kv_bits=kv_bits, rope_scaling=rope_scaling, check_memory=check_memory)
    if choice.backend == "llama.cpp":
        from . import llama_cpp

        # a sequence for each running request, and one to compute next turns' states
        runtime = llama_cpp.load(choice.path, dtype=dtype, n_seq_max=max_concurrent + 1, mtp=mtp, **options)
    else:
        from . import mlx

        runtime = mlx.load(choice.path, dtype=dtype, lazy=lazy, mtp=mtp, parallel=parallel, **options)
        if isinstance(runtime, mlx.DistributedRuntime):
            if runtime.placement.rank > 0:  # this process makes rank 0's calls on its part, then ends
                runtime.follow()
                sys.exit(0)
            prefix_cache_dir = None  # a file would hold rank 0's part of a state only
    if prefix_cache is True:
        prefix_cache = min(4 << 30, memory_budget() // 8)
    if prefix_cache_dir is True:
        prefix_cache_dir = Path(user_cache_dir("mlxqwen")) / "prefix-cache"
    cache = PrefixCache(runtime, int(prefix_cache), Path(prefix_cache_dir) if prefix_cache_dir else None)
    llm = LLM(runtime, cache, max_concurrent, max_queue, mtp_depth)
    if choice.note:
        logger.warning(choice.note)
    return llm


def sizing(
    path: str | Path,
    backend: str = "auto",
    *,
    dtype: mx.Dtype | None = None,
    kv_bits: int | None = None,
    rope_scaling: dict[str, Any] | None = None,
    max_concurrent: int = 8,
) -> tuple[Choice, memory.Sizing]:
    """The runtime `load` would choose for the model in `path` (or of that name, as `mlxqwen list`
    shows it), and the memory policy's view of it there, reading no weight: a GGUF file's header,
    a checkpoint's tensor headers, or a directory's config.json alone (a model not downloaded yet
    runs on MLX)."""
    yarn = parse_yarn(rope_scaling)
    choice = choose(resolve_model(path), backend)
    if choice.backend == "llama.cpp":
        from . import llama_cpp

        plan = llama_cpp.sizing(choice.path, dtype=dtype, kv_bits=kv_bits, yarn=yarn, n_seq_max=max_concurrent + 1)
        return choice, plan
    from . import mlx

    return choice, mlx.sizing(choice.path, dtype=dtype, kv_bits=kv_bits, yarn=yarn)
