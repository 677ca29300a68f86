"""Will a model fit? mlxqwen's one memory policy: what a model needs on each runtime at a given
context, the longest context that fits, the least context worth running, and the messages
that say so. The MLX and llama.cpp backends, `mlxqwen fit`, `pull` and the chat app all
decide with it.

A model needs
- weights: as the runtime holds them (MLX: the parameters after casting and quantization,
  counted exactly; llama.cpp: the GGUF's tensor data, memory-mapped);
- K/V cache: grows with the context, in blocks of 256 positions on both runtimes (llama.cpp
  allocates the whole context up front);
- recurrent state: the fixed state of Gated DeltaNet layers, one per sequence;
- working memory: the transients of a forward pass. MLX: a prefill chunk's attention scores
  (chunk x heads x context, fp32, as with any attention that materializes them) and causal
  mask, a layer's K/V copied as the cache grows, a dequantized layer of a quantized cache,
  the MLP or Gated DeltaNet activations, and a decode step of every sequence. llama.cpp: its
  compute buffer (the attention mask, the scores when flash attention is off, the
  activations of a ubatch, the logits), its output buffer, its graphs' metadata and the
  bookkeeping of its K/V cells;
- runtime: an allowance for the process (interpreter, libraries), plus the tokenizer's
  tables (llama.cpp's and ours: about 440 bytes per token of the vocabulary).

The budget is Metal's recommended working set on a Mac GPU (what macOS lets the GPU wire),
else 85 % of physical memory (the rest is the system's)."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .config import ModelConfig, Yarn, context_limit, trained_context, yarn_hint
from .errors import InsufficientMemoryError, ModelLoadError, option
from .gguf_file import read_header

GiB = 1024**3
BLOCK = 256  # contexts are chosen, and K/V caches allocated, in blocks of this many positions
MIN_CONTEXT = 4096  # the least context worth running a model with (or the model's own, if smaller)
PROCESS = GiB // 2  # interpreter, libraries, allocator slack
_TOKEN_TABLES = 448  # bytes per vocabulary token of the tokenizers' tables (llama.cpp's and ours: about 440)
_LLAMA_LIBRARY = 16 * 1024**2  # llama.cpp's CPU backend and threads, set up by the first load (about 10 MiB)
_LLAMA_CELL = 64  # bytes of bookkeeping per K/V cell (position, sequence set)
_TIGHT = 0.9  # above this share of the budget a model fits only with everything else closed

Estimator = Callable[[int], "MemoryEstimate"]  # context -> the estimate at that context


def total_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def memory_budget() -> int:
    """Bytes a model may use on this machine."""
    if mx.default_device() == mx.gpu and mx.metal.is_available():
        return int(mx.device_info()["max_recommended_working_set_size"])
    return int(total_memory() * 0.85)


@dataclass(frozen=True)
class MemoryEstimate:
    context: int
    weights: int
    kv_cache: int
    recurrent_state: int
    working: int
    runtime: int
    budget: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.recurrent_state + self.working + self.runtime

    @property
    def fits(self) -> bool:
        return self.total <= self.budget

    @property
    def verdict(self) -> str:
        need, have = self.total / GiB, self.budget / GiB
        if not self.fits:
            return f"does not fit: needs {need:.1f} GiB, this machine allows {have:.1f} GiB"
        if self.total > _TIGHT * self.budget:
            return f"fits, tightly: {need:.1f} of {have:.1f} GiB; close other applications"
        return f"fits: {need:.1f} of {have:.1f} GiB"


def _blocks(n: int) -> int:
    return -(-n // BLOCK) * BLOCK


def runtime_bytes(vocab_size: int) -> int:
    """The process and the tokenizer's tables."""
    return PROCESS + vocab_size * _TOKEN_TABLES


# --- MLX ----------------------------------------------------------------------------------


def weight_bytes(model: nn.Module) -> int:
    return sum(p.nbytes for _, p in tree_flatten(model.parameters()))


def kv_group_size(head_dim: int) -> int:
    """The quantization group of a K/V cache: the largest of MLX's group sizes (64, 32) that
    divides the head size."""
    for size in (64, 32):
        if head_dim % size == 0:
            return size
    raise ValueError(f"kv_bits: head size {head_dim} is not a multiple of 32, which K/V quantization needs")


def _attention_layers(cfg: ModelConfig) -> int:
    if not cfg.layer_types:
        return cfg.num_hidden_layers
    return sum(t != "linear_attention" for t in cfg.layer_types)


def _kv_bytes_per_token(cfg: ModelConfig, dtype: mx.Dtype, kv_bits: int | None) -> float:
    """K/V bytes per position of one attention layer."""
    per_vector = cfg.head_dim * dtype.size
    if kv_bits:  # packed values, plus a scale and a bias per group
        per_vector = cfg.head_dim * kv_bits / 8 + 2 * (cfg.head_dim // kv_group_size(cfg.head_dim)) * dtype.size
    return 2 * cfg.num_key_value_heads * per_vector


def _recurrent_bytes(cfg: ModelConfig, dtype: mx.Dtype) -> int:
    layers = cfg.num_hidden_layers - _attention_layers(cfg)
    conv_dim = (
        2 * cfg.linear_num_key_heads * cfg.linear_key_head_dim + cfg.linear_num_value_heads * cfg.linear_value_head_dim
    )
    conv = (cfg.linear_conv_kernel_dim - 1) * conv_dim * dtype.size
    state = cfg.linear_num_value_heads * cfg.linear_key_head_dim * cfg.linear_value_head_dim * 4  # fp32
    return layers * (conv + state)


def mlx_estimate(
    cfg: ModelConfig,
    context: int,
    *,
    weights: int,
    dtype: mx.Dtype,
    kv_bits: int | None = None,
    sequences: int = 1,
    prefill_chunk: int = 512,
    budget: int | None = None,
) -> MemoryEstimate:
    """Memory to run a model on MLX with `sequences` sequences of up to `context` tokens each,
    prompts read `prefill_chunk` tokens at a time.
    weights: bytes of its parameters (`weight_bytes`); dtype: the compute dtype (activations, K/V)."""
    slots = _blocks(context)
    chunk = min(prefill_chunk, max(context, 1))
    layer_kv = slots * _kv_bytes_per_token(cfg, dtype, kv_bits)
    attention = (
        chunk * cfg.num_attention_heads * slots * 4  # scores, fp32
        + chunk * slots  # causal mask
        + 3 * layer_kv  # the layer's K/V as the cache grows: old and new buffers, and the keys attention reads
        + (2 * slots * cfg.num_key_value_heads * cfg.head_dim * dtype.size if kv_bits else 0)  # dequantized
    )
    mlp = max(
        cfg.intermediate_size, cfg.moe_intermediate_size * cfg.num_experts_per_tok + cfg.shared_expert_intermediate_size
    )
    # the chunked Gated DeltaNet (64-token chunks, fp32): chunk matrices and per-head q, k, v (measured: 12 of
    # each per value head and token)
    linear = 13 * cfg.linear_num_value_heads * (64 + max(cfg.linear_key_head_dim, cfg.linear_value_head_dim)) * 4
    decode = sequences * (cfg.num_attention_heads * slots * 4 + cfg.vocab_size * 4)
    activations = 16 * chunk * cfg.hidden_size * dtype.size  # hidden states, projections, their transposes
    working = attention + max(3 * chunk * mlp * dtype.size, chunk * linear) + activations + decode
    return MemoryEstimate(
        context=context,
        weights=weights,
        kv_cache=int(sequences * _attention_layers(cfg) * layer_kv),
        recurrent_state=sequences * _recurrent_bytes(cfg, dtype),
        working=int(working),
        runtime=runtime_bytes(cfg.vocab_size),
        budget=memory_budget() if budget is None else budget,
    )


# --- llama.cpp ----------------------------------------------------------------------------

# bytes per value of llama.cpp's K/V cache types
KV_TYPE_BYTES = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}


@dataclass(frozen=True)
class GGUFModel:
    """A GGUF model's dimensions as llama.cpp reads them from its metadata, and its weights."""

    path: Path
    architecture: str
    context_length: int  # the trained context
    n_vocab: int
    n_embd: int
    n_head: int
    n_head_kv: tuple[int, ...]  # per layer
    head_k: int
    head_v: int
    n_ff: int
    n_expert: int
    n_expert_used: int
    n_ff_exp: int
    n_ff_shexp: int
    recurrent: tuple[bool, ...]  # per layer: a Gated DeltaNet layer
    ssm_conv: int
    ssm_inner: int
    ssm_state: int
    ssm_groups: int
    ssm_heads: int
    yarn: tuple[float, int] | None  # the file's own YaRN scaling: (factor, original context)
    nextn: int  # the MTP head's layers, the last of block_count
    tensors: int
    weights: int

    @classmethod
    def read(cls, path: str | Path) -> GGUFModel:
        path = Path(path)
        header = read_header(path)
        meta = header.metadata
        arch = meta.get("general.architecture")
        if not isinstance(arch, str):
            raise ModelLoadError(f"{path}: missing GGUF key 'general.architecture'")

        def get(key: str, default=None):
            return meta.get(f"{arch}.{key}", default)

        def per_layer(value, layers: int) -> tuple:
            return tuple(value) if isinstance(value, list) else (value,) * layers

        layers, n_embd, n_head = get("block_count"), get("embedding_length"), get("attention.head_count")
        if not (layers and n_embd and n_head):
            raise ModelLoadError(f"{path}: GGUF metadata lacks {arch}.block_count, embedding_length or head_count")
        n_head = max(per_layer(n_head, layers))
        recurrent = get("attention.recurrent_layers")
        if recurrent is None:
            interval = get("full_attention_interval", 4)
            recurrent = [bool(get("ssm.inner_size")) and (i + 1) % interval != 0 for i in range(layers)]
        yarn = None
        if get("rope.scaling.type") == "yarn":
            yarn = (float(get("rope.scaling.factor", 1.0)), int(get("rope.scaling.original_context_length") or 0))
        vocab = meta.get("tokenizer.ggml.tokens")
        return cls(
            path=path,
            architecture=arch,
            context_length=int(get("context_length", 0)),
            n_vocab=int(get("vocab_size") or vocab or 0),
            n_embd=n_embd,
            n_head=n_head,
            n_head_kv=per_layer(get("attention.head_count_kv", n_head), layers),
            head_k=get("attention.key_length", n_embd // n_head),
            head_v=get("attention.value_length", n_embd // n_head),
            n_ff=max(per_layer(get("feed_forward_length", 0), layers)),
            n_expert=get("expert_count", 0),
            n_expert_used=get("expert_used_count", 0),
            n_ff_exp=get("expert_feed_forward_length", 0),
            n_ff_shexp=get("expert_shared_feed_forward_length", 0),
            recurrent=tuple(bool(r) for r in recurrent),
            ssm_conv=get("ssm.conv_kernel", 0),
            ssm_inner=get("ssm.inner_size", 0),
            ssm_state=get("ssm.state_size", 0),
            ssm_groups=get("ssm.group_count", 0),
            ssm_heads=get("ssm.time_step_rank", 0),
            yarn=yarn,
            nextn=int(get("nextn_predict_layers", 0)),
            tensors=header.tensors,
            weights=header.data_bytes,
        )


def _llama_graphs(m: GGUFModel, ubatch: int) -> int:
    """llama.cpp's graph metadata: two graph buffers and the scheduler's copy, each about 420
    bytes per node of its largest graph (Gated DeltaNet models unroll the delta rule's chunks)."""
    nodes = max(40 * ubatch, 32 * m.tensors) if any(m.recurrent) else max(1024, 8 * m.tensors)
    return 3 * 420 * nodes


def _llama_compute(
    m: GGUFModel, n_kv: int, ubatch: int, sequences: int, outputs: int, flash_attn: bool, n_rs_seq: int = 0
) -> int:
    """llama.cpp's compute buffer: the attention masks, plus the largest of the transients of an
    attention layer (with the scores when flash attention is off), an FFN, a Gated DeltaNet
    layer and the output layer, for a ubatch of `ubatch` tokens. The activation terms are a
    bound fitted to llama.cpp's own allocations for Qwen shapes from 0.6B to 35B."""
    act = ubatch * 4 * 1.1  # bytes of one fp32 feature over the ubatch, and a margin of 10 %
    gated = any(m.recurrent)  # Qwen3.5's attention has an output gate in q
    attention = int(
        act
        * (
            4 * m.n_embd
            + (2 if gated else 1) * m.n_head * m.head_k
            + m.n_head * m.head_v
            + 2 * max(m.n_head_kv) * m.head_k
        )
    )
    if m.n_expert:
        ffn = int(
            act * (m.n_embd * (m.n_expert_used + 5) + 3 * m.n_ff_exp * m.n_expert_used + 3 * m.n_ff_shexp + m.n_expert)
        )
    else:
        ffn = int(act * (4 * m.n_embd + 3 * m.n_ff))
    linear = 0
    if gated:  # chunked delta rule: per-chunk matrices, q/k/v/z and the state of every head
        keys = m.ssm_groups * m.ssm_state
        linear = 10 * min(sequences, ubatch) * m.ssm_state * m.ssm_inner + int(
            act * (3.1 * m.n_embd + 5.8 * keys + 2.1 * m.ssm_inner + 1.05 * 64 * m.ssm_heads)
        )
        if n_rs_seq:  # states kept to roll back to: the delta rule runs token by token (fitted: 27B, 35B-A3B, the demo)
            linear = max(linear, int(act * 13.5 * m.ssm_inner) + 16 * 2**20)
    output = int(act * 2 * m.n_embd) + outputs * m.n_vocab * 4
    mask = n_kv * (ubatch + 64) * (2 if flash_attn else 4)  # a ubatch's, and a token's (padded to 64 rows)
    scores = 0 if flash_attn else n_kv * ubatch * m.n_head * 4  # KQ, fp32
    return mask + scores + max(attention, ffn, linear, output)


def llama_estimate(
    model: GGUFModel,
    context: int,
    *,
    kv_type: str = "f16",
    n_seq_max: int = 1,
    n_batch: int = 512,
    n_ubatch: int = 512,
    n_outputs: int = 1,
    kv_unified: bool = False,
    flash_attn: bool | None = None,
    n_rs_seq: int = 0,
    mtp: bool = False,
    budget: int | None = None,
) -> MemoryEstimate:
    """Memory to run a GGUF model in a llama.cpp context of `context` tokens (llama.cpp's
    n_ctx, padded to a multiple of 256 as llama.cpp does), with these context parameters:
    n_seq_max sequences (each with its own recurrent state; unless kv_unified, each gets an
    equal share of the K/V cells), batches of n_batch tokens computed n_ubatch at a time, at
    most n_outputs logits per batch (llama.cpp's n_outputs_max), n_rs_seq more recurrent states
    per sequence to roll back to. flash_attn: None = on unless the K/V cache is f32 (as
    `mlxqwen.backends.llama_cpp` sets it). mtp: with a second context that runs the MTP head."""
    if kv_type not in KV_TYPE_BYTES:
        raise ValueError(f"kv_type={kv_type!r}: choose one of {', '.join(KV_TYPE_BYTES)}")
    flash_attn = kv_type != "f32" if flash_attn is None else flash_attn
    n_ctx = _blocks(max(context, 1))
    n_kv = n_ctx if kv_unified else _blocks(n_ctx // n_seq_max)
    n_ctx = n_ctx if kv_unified else n_kv * n_seq_max
    layers = range(len(model.recurrent) - (0 if mtp else model.nextn))  # the head's K/V is in its own context
    kv_per_cell = sum(model.n_head_kv[i] * (model.head_k + model.head_v) for i in layers if not model.recurrent[i])
    per_sequence = sum(model.recurrent) * (
        (model.ssm_conv - 1) * (model.ssm_inner + 2 * model.ssm_groups * model.ssm_state)
        + model.ssm_state * model.ssm_inner
    )
    outputs, ubatch = max(n_outputs, n_seq_max), min(n_ubatch, n_batch)
    compute = _llama_compute(model, n_kv, ubatch, n_seq_max, outputs, flash_attn, n_rs_seq)
    # the head's context: a model's buffers without the rollback states, logits for each sequence
    head = _llama_compute(model, n_kv, ubatch, n_seq_max, n_seq_max, flash_attn) + n_seq_max * model.n_vocab * 4
    head = head if mtp else 0
    return MemoryEstimate(
        context=context,
        weights=model.weights,
        kv_cache=int(n_ctx * kv_per_cell * KV_TYPE_BYTES[kv_type]),
        recurrent_state=n_seq_max * (1 + n_rs_seq) * per_sequence * 4,  # fp32
        working=compute + outputs * model.n_vocab * 4 + _llama_graphs(model, ubatch) + n_ctx * _LLAMA_CELL + head,
        runtime=runtime_bytes(model.n_vocab) + _LLAMA_LIBRARY,
        budget=memory_budget() if budget is None else budget,
    )


# --- the policy ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizing:
    """A model on one runtime, as the memory policy sees it."""

    estimate: Estimator  # context -> what the model needs at that context
    limit: int  # the longest context the model handles: the trained one, or extended with YaRN
    trained: int  # the context it was trained for, which YaRN extends


def mlx_sizing(
    cfg: ModelConfig,
    *,
    weights: int,
    dtype: mx.Dtype,
    kv_bits: int | None = None,
    sequences: int = 1,
    prefill_chunk: int = 512,
) -> Sizing:
    """A model on MLX (see `mlx_estimate`); YaRN scaling is already in `cfg` (`config.with_yarn`)."""
    estimate = partial(mlx_estimate, cfg, weights=weights, dtype=dtype, kv_bits=kv_bits, sequences=sequences)
    return Sizing(partial(estimate, prefill_chunk=prefill_chunk), context_limit(cfg), trained_context(cfg))


def llama_sizing(model: GGUFModel, *, yarn: Yarn | None = None, **context_params: Any) -> Sizing:
    """A GGUF model on llama.cpp with these context parameters (see `llama_estimate`), its
    context extended by `yarn` if given."""
    trained = model.context_length
    limit = trained
    if model.yarn is not None:  # the file's own scaling
        factor, original = model.yarn
        trained = original or trained
        limit = max(limit, math.floor(trained * factor))
    if yarn is not None:
        trained = yarn.original or trained
        limit = math.floor(trained * yarn.factor)
    return Sizing(partial(llama_estimate, model, **context_params), limit, trained)


def largest_context(sizing: Sizing, cap: int | None = None) -> int:
    """The longest context that fits: the model's limit (or `cap`) if it does, else the longest
    multiple of 256 below it; 0 if none."""
    top = min(sizing.limit, cap or sizing.limit)
    if sizing.estimate(top).fits:
        return top
    lo, hi = 0, (top - 1) // BLOCK
    while lo < hi:  # estimates grow with the context: binary search over blocks
        mid = (lo + hi + 1) // 2
        if sizing.estimate(mid * BLOCK).fits:
            lo = mid
        else:
            hi = mid - 1
    return lo * BLOCK


def minimum_context(sizing: Sizing) -> int:
    """The least context worth running the model with."""
    return min(MIN_CONTEXT, sizing.limit)


def fits_hint(sizing: Sizing) -> str:
    """What to ask for instead of a context that does not fit."""
    fits = largest_context(sizing)
    return f"{option('max_context', fits)} fits" if fits else "use a smaller or more quantized model"


def choose_context(
    sizing: Sizing,
    *,
    requested: int | None = None,
    default_cap: int | None = None,
    check_memory: bool = True,
    where: str,
) -> int:
    """The context to load a model with.

    requested: the caller's max_context. It must be within the model's limit (past it, the
        message gives the YaRN option that reaches it) and, with check_memory, fit in memory.
    Otherwise: the longest context that fits, in blocks of 256, at most the model's limit and
    `default_cap`; a model whose minimum context (4096 tokens, or its limit if less) does not
    fit is refused. where: what the messages name (the model's path).
    Raises InsufficientMemoryError, or ModelLoadError for a context past the limit, with a
    one-line message that says what would do."""
    if requested is not None:
        if requested < 1:
            raise ValueError(f"{option('max_context', requested)}: give a positive number of tokens")
        if requested > sizing.limit:
            fits = fits_hint(sizing) if check_memory else f"{option('max_context', sizing.limit)} is the most"
            raise ModelLoadError(
                f"{where}: {option('max_context', requested)} is past the {sizing.limit:,} tokens this model handles; "
                f"{fits}, or {yarn_hint(requested, sizing.trained)}"
            )
        if check_memory:
            plan = sizing.estimate(requested)
            if not plan.fits:
                raise InsufficientMemoryError(
                    f"{where}: at {option('max_context', requested)} the model {plan.verdict}; {fits_hint(sizing)}"
                )
        return requested
    cap = min(sizing.limit, default_cap or sizing.limit)
    if not check_memory:
        return cap
    context, least = largest_context(sizing, cap), min(minimum_context(sizing), cap)
    if context < least:
        raise InsufficientMemoryError(
            f"{where}: at {least} tokens of context the model {sizing.estimate(least).verdict}; "
            "use a smaller or more quantized model"
        )
    return context
