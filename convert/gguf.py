"""GGUF export for llama.cpp: `convert_to_gguf(src, out, quant)`.

The core loads and checks the checkpoint (every layout it reads: Hugging Face, multimodal,
per-expert or fused experts, MLX quantized) into its canonical form: Qwen3.5 decoder norms
already hold 1 + w, conv1d is [C, K, 1]. This module maps that form onto llama.cpp's tensors
(names from gguf-py's TensorNameMap), writes the metadata and the tokenizer, and streams the
tensors to disk one at a time. F32/F16/BF16/Q8_0 are written by gguf-py; K-quants are made
from a BF16 file by llama.cpp's own quantizer (llama-cpp-python). A Qwen3.5/3.6 checkpoint's
multi-token-prediction head (`mtp.*`) is written as llama.cpp's qwen35 format defines it
(the `nextn` tensors), unless `no_mtp`.

Also the `gguf` output format of `mlxqwen convert` (OPTIONS, default_output, convert; see api.py)."""

from __future__ import annotations

import ctypes
import json
import logging
import time
from pathlib import Path
from typing import Any, BinaryIO

import gguf
import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from rich.progress import Progress

from mlxqwen.checkpoint import read_weights
from mlxqwen.config import ModelConfig
from mlxqwen.errors import ModelLoadError
from mlxqwen.loader import load_model
from mlxqwen.models.moe import stack_experts

from .api import ConvertResult
from .errors import ConvertError
from .output import check_free_space, staged
from .progress import add_task
from .source import Source

Q = gguf.GGMLQuantizationType
FT = gguf.LlamaFileType

# --quant -> (type gguf-py writes the matrices in, file type, llama.cpp file type to requantize to)
QUANTS: dict[str, tuple[Q, FT, FT | None]] = {
    "F32": (Q.F32, FT.ALL_F32, None),
    "F16": (Q.F16, FT.MOSTLY_F16, None),
    "BF16": (Q.BF16, FT.MOSTLY_BF16, None),
    "Q8_0": (Q.Q8_0, FT.MOSTLY_Q8_0, None),
    # BF16 holds Qwen's bf16 weights exactly, so the quantizer sees the original values.
    "Q4_K_M": (Q.BF16, FT.MOSTLY_BF16, FT.MOSTLY_Q4_K_M),
}

# Matrices that llama.cpp's converter and quantizer keep in F32 (its kernels expect them so).
_F32_MATRICES = {"ffn_gate_inp", "ffn_gate_inp_shexp", "ssm_conv1d"}

# The split regex of tokenizer.json -> llama.cpp's name for that pre-tokenizer.
_PRE_TOKENIZERS = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": (
        "qwen2"
    ),
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+": "qwen35",
}

_CHUNK_BYTES = 64 << 20  # fp32 rows converted and written at a time

_QWEN35_DEFAULT_MROPE = [11, 11, 10]  # transformers' default for Qwen3.5 configs that omit it

# The MTP head's own tensors -> llama.cpp's nextn tensors of the head's block
_NEXTN = {
    "fc": gguf.MODEL_TENSOR.NEXTN_EH_PROJ,  # joins [embedding, hidden state]
    "pre_fc_norm_embedding": gguf.MODEL_TENSOR.NEXTN_ENORM,
    "pre_fc_norm_hidden": gguf.MODEL_TENSOR.NEXTN_HNORM,
    "norm": gguf.MODEL_TENSOR.NEXTN_SHARED_HEAD_NORM,
}


def llama_arch(cfg: ModelConfig, source: str) -> gguf.MODEL_ARCH:
    """llama.cpp's architecture for this config, or a one-line error for what llama.cpp can't run."""
    moe = cfg.num_experts > 0
    arch = {
        "qwen2": gguf.MODEL_ARCH.QWEN2,
        "qwen3": gguf.MODEL_ARCH.QWEN3MOE if moe else gguf.MODEL_ARCH.QWEN3,
        "qwen3_moe": gguf.MODEL_ARCH.QWEN3MOE,
        "qwen3_5": gguf.MODEL_ARCH.QWEN35MOE if moe else gguf.MODEL_ARCH.QWEN35,
    }[cfg.family]

    def unsupported(what: str) -> ModelLoadError:
        return ModelLoadError(f"{source}: {what}; llama.cpp's {gguf.MODEL_ARCH_NAMES[arch]} cannot run it")

    if cfg.family == "qwen2" and cfg.head_dim * cfg.num_attention_heads != cfg.hidden_size:
        raise unsupported("head_dim × num_attention_heads differs from hidden_size")
    if cfg.attention_bias and cfg.family != "qwen2":
        raise unsupported("attention_bias is set (o_proj bias)")
    if moe and not all(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers)):
        raise unsupported("some layers are dense (mlp_only_layers / decoder_sparse_step)")
    if moe and not cfg.norm_topk_prob:
        raise unsupported("norm_topk_prob is false")
    if arch == gguf.MODEL_ARCH.QWEN35MOE and not cfg.shared_expert_intermediate_size:
        raise unsupported("there is no shared expert")
    if cfg.family == "qwen3_5" and cfg.linear_key_head_dim != cfg.linear_value_head_dim:
        raise unsupported("linear_key_head_dim differs from linear_value_head_dim")
    return arch


def _rope_sections(cfg: ModelConfig, source: str) -> list[int]:
    sections = cfg.rope.mrope_section or _QWEN35_DEFAULT_MROPE
    rotary = int(cfg.head_dim * cfg.rope.partial_rotary_factor)
    if 2 * sum(sections) > rotary:  # llama.cpp aborts the process on such a file
        raise ModelLoadError(
            f"{source}: mrope_section {sections} needs {2 * sum(sections)} rotary dims, "
            f"head_dim × partial_rotary_factor gives {rotary}"
        )
    return (sections + [0, 0, 0, 0])[:4]


def _write_metadata(
    w: gguf.GGUFWriter, cfg: ModelConfig, arch: gguf.MODEL_ARCH, name: str, source: str, mtp_layers: int
) -> None:
    w.add_name(name)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers + mtp_layers)  # the MTP head's layers come after the decoder's
    if mtp_layers:
        w.add_nextn_predict_layers(mtp_layers)
    if cfg.intermediate_size:
        w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)

    rope = cfg.rope
    w.add_rope_freq_base(rope.theta)
    w.add_rope_dimension_count(int(cfg.head_dim * rope.partial_rotary_factor))
    if rope.type == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope.factor)
    elif rope.type == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(rope.factor)
        w.add_rope_scaling_orig_ctx_len(rope.original_max_position_embeddings or cfg.max_position_embeddings)
        w.add_rope_scaling_yarn_beta_fast(rope.beta_fast)
        w.add_rope_scaling_yarn_beta_slow(rope.beta_slow)
        if rope.attention_factor is not None:
            w.add_rope_scaling_yarn_attn_factor(float(rope.attention_factor))

    if cfg.num_experts:
        w.add_expert_count(cfg.num_experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
        if cfg.shared_expert_intermediate_size:
            w.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size)

    if cfg.family == "qwen3_5":
        w.add_rope_dimension_sections(_rope_sections(cfg, source))
        w.add_ssm_conv_kernel(cfg.linear_conv_kernel_dim)
        w.add_ssm_state_size(cfg.linear_key_head_dim)
        w.add_ssm_group_count(cfg.linear_num_key_heads)
        w.add_ssm_time_step_rank(cfg.linear_num_value_heads)
        w.add_ssm_inner_size(cfg.linear_value_head_dim * cfg.linear_num_value_heads)
        recurrent = [t == "linear_attention" for t in cfg.layer_types] + [False] * mtp_layers
        w.add_array(f"{gguf.MODEL_ARCH_NAMES[arch]}.attention.recurrent_layers", recurrent)


def _split_regex(tokenizer: dict) -> str | None:
    pre = tokenizer.get("pre_tokenizer") or {}
    for step in pre.get("pretokenizers", [pre]):
        if step.get("type") == "Split":
            return (step.get("pattern") or {}).get("Regex")
    return None


def _write_tokenizer(w: gguf.GGUFWriter, src: Path, vocab_size: int) -> None:
    """The byte-level BPE as llama.cpp's `gpt2` model: tokens padded to the model's vocab size."""
    file = src / "tokenizer.json"
    if not file.is_file():
        raise ModelLoadError(f"{file}: not found; GGUF export needs the model's tokenizer")
    tokenizer = json.loads(file.read_text(encoding="utf-8"))
    bpe = tokenizer.get("model") or {}
    if bpe.get("type") != "BPE":
        raise ModelLoadError(f"{file}: expected a byte-level BPE tokenizer (Qwen's), got {bpe.get('type')!r}")
    pre = _PRE_TOKENIZERS.get(_split_regex(tokenizer) or "")
    if pre is None:
        raise ModelLoadError(f"{file}: pre-tokenizer regex is not Qwen2's or Qwen3.5's, which llama.cpp knows")

    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    entries = [(text, i, gguf.TokenType.NORMAL) for text, i in bpe["vocab"].items()]
    for added in tokenizer.get("added_tokens", []):
        text = added["content"]
        # llama.cpp treats <|...|> tokens as control tokens even when not marked special (e.g. <|fim_prefix|>).
        control = added.get("special") or (text.startswith("<|") and text.endswith("|>"))
        entries.append((text, added["id"], gguf.TokenType.CONTROL if control else gguf.TokenType.USER_DEFINED))
    for text, i, kind in entries:
        if i >= vocab_size:
            raise ModelLoadError(f"{file}: token {text!r} has id {i}, beyond the model's vocab_size {vocab_size}")
        tokens[i], types[i] = text, kind

    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    # merges, special token ids, add_bos and the chat template (tokenizer_config.json / chat_template.jinja)
    gguf.SpecialVocab(src, load_merges=True, n_vocab=vocab_size).add_to_gguf(w, quiet=True)


def _tiled_v_heads(prefix: int, cfg: ModelConfig, head: int) -> mx.array:
    """Index that keeps `prefix` rows (q and k) and moves the V heads after them from grouped by
    K head (k0v0 k0v1 k1v0 k1v1) to tiled (k0v0 k1v0 k0v1 k1v1), the order in which ggml
    broadcasts K heads over V heads."""
    n_k, n_v = cfg.linear_num_key_heads, cfg.linear_num_value_heads
    v = np.arange(n_v * head).reshape(n_k, n_v // n_k, head).transpose(1, 0, 2).reshape(-1)
    return mx.array(np.concatenate([np.arange(prefix), prefix + v]))


def _to_llama(key: str, value: mx.array, cfg: ModelConfig) -> tuple[str, mx.array]:
    """One canonical tensor in llama.cpp's layout, under a name TensorNameMap knows."""
    key = key.removeprefix("language_model.").replace(".switch_mlp.", ".experts.")
    if ".linear_attn." not in key:
        return key, value
    if key.endswith(".conv1d.weight"):
        value = value.squeeze(-1)  # [C, K]
    elif key.endswith(".A_log"):
        value = -mx.exp(value.astype(mx.float32))  # llama.cpp multiplies softplus(a + dt_bias) by ssm_a
    elif key.endswith(".dt_bias"):
        key = key.replace(".dt_bias", ".dt_proj.bias")
    if cfg.linear_num_value_heads != cfg.linear_num_key_heads:
        key_dims = 2 * cfg.linear_num_key_heads * cfg.linear_key_head_dim
        v_dim = cfg.linear_value_head_dim
        per_head = {
            ".in_proj_qkv.": (0, key_dims, v_dim),
            ".conv1d.": (0, key_dims, v_dim),
            ".in_proj_z.": (0, 0, v_dim),
            ".in_proj_a.": (0, 0, 1),
            ".in_proj_b.": (0, 0, 1),
            ".A_log": (0, 0, 1),
            ".dt_proj.": (0, 0, 1),
            ".out_proj.": (1, 0, v_dim),
        }
        for part, (axis, prefix, head) in per_head.items():
            if part in key:
                value = mx.take(value, _tiled_v_heads(prefix, cfg, head), axis=axis)
    return key, value


def _canonical_weights(src: Path) -> tuple[dict[str, mx.array], ModelConfig]:
    """The checked tensors of the model as the core holds them (lazy), quantized ones dequantized."""
    model, cfg = load_model(src, dtype=mx.float32, lazy=True)
    weights = dict(tree_flatten(model.parameters()))
    for path, module in model.named_modules():
        if "scales" in module:
            weights[f"{path}.weight"] = mx.dequantize(
                module.weight,
                module.scales,
                module.get("biases"),
                group_size=module.group_size,
                bits=module.bits,
                mode=module.mode,
            )
            weights.pop(f"{path}.scales")
            weights.pop(f"{path}.biases", None)
    return weights, cfg


def _mtp_weights(src: Path, cfg: ModelConfig) -> dict[str, mx.array]:
    """The checkpoint's MTP head (lazy), in Hugging Face names, experts stacked like the decoder's;
    an MLX directory's quantized head dequantized."""
    weights, _ = read_weights(src)
    mtp = {k: v for k, v in weights.items() if k.startswith("mtp.")}
    quantization = cfg.quantization or {}
    for scales in [k for k in mtp if k.endswith(".scales")]:
        path = scales.removesuffix(".scales")
        override = quantization.get(path)
        params = {k: quantization[k] for k in ("group_size", "bits", "mode") if k in quantization}
        params.update(override if isinstance(override, dict) else {})
        mtp[f"{path}.weight"] = mx.dequantize(
            mtp[f"{path}.weight"], mtp.pop(scales), mtp.pop(f"{path}.biases", None), **params
        )
    for layer in range(_mtp_layers(mtp)):
        if cfg.num_experts:
            stack_experts(mtp, f"mtp.layers.{layer}.mlp", cfg.num_experts)
    return mtp


def _mtp_layers(mtp: dict[str, mx.array]) -> int:
    return len({k.split(".")[2] for k in mtp if k.startswith("mtp.layers.")})


def _mtp_to_llama(key: str, value: mx.array, cfg: ModelConfig) -> tuple[str, mx.array]:
    """One tensor of the MTP head as llama.cpp's qwen35 defines it: head layer i is block
    n_layer + i (a decoder layer, named as the decoder's), the head's own tensors are that block's
    nextn tensors. Every norm of the head computes x̂·(1 + w), as the decoder's do, so holds 1 + w."""
    if "norm" in key and value.ndim == 1:
        value = value.astype(mx.float32) + 1.0
    _, part, rest = key.split(".", 2)
    if part == "layers":
        layer, rest = rest.split(".", 1)
        return f"model.layers.{cfg.num_hidden_layers + int(layer)}.{rest}", value
    if part in _NEXTN and rest == "weight":
        return f"{gguf.TENSOR_NAMES[_NEXTN[part]].format(bid=cfg.num_hidden_layers)}.weight", value
    return key, value  # no counterpart: the caller says so


def _tensor_type(name: str, shape: tuple[int, ...], matrix_type: Q) -> Q:
    if len(shape) == 1 or not name.endswith(".weight") or name.endswith("_norm.weight"):
        return Q.F32
    if name.split(".")[-2] in _F32_MATRICES:
        return Q.F32
    block, _ = gguf.GGML_QUANT_SIZES[matrix_type]
    return Q.F16 if shape[-1] % block else matrix_type  # llama.cpp's converter falls back the same way


def _nbytes(shape: tuple[int, ...], qtype: Q) -> int:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape)) // block * size


def _write_rows(f: BinaryIO, value: mx.array, qtype: Q) -> None:
    """Quantize and write a tensor a few rows at a time (quantization blocks lie along rows),
    so that no more than one copy of it is in memory."""
    rows = value.reshape(-1, value.shape[-1])
    step = max(1, _CHUNK_BYTES // (4 * rows.shape[1]))
    for start in range(0, rows.shape[0], step):
        chunk = np.array(rows[start : start + step].astype(mx.float32))
        gguf.quants.quantize(chunk, qtype).tofile(f)


def _write_gguf(
    src: Path, out: Path, name: str, matrix_type: Q, file_type: FT, progress: Progress | None, mtp: bool
) -> int:
    """Write the GGUF (with the MTP head where the checkpoint has one and `mtp`); returns the
    number of parameters in it."""
    weights, cfg = _canonical_weights(src)
    source = str(src / "config.json")
    arch = llama_arch(cfg, source)
    head = _mtp_weights(src, cfg) if mtp and cfg.family == "qwen3_5" else {}
    w = gguf.GGUFWriter(out, gguf.MODEL_ARCH_NAMES[arch])
    w.add_file_type(file_type)
    _write_metadata(w, cfg, arch, name, source, _mtp_layers(head))
    _write_tokenizer(w, src, cfg.vocab_size)

    names = gguf.get_tensor_name_map(arch, cfg.num_hidden_layers + _mtp_layers(head))
    weights.update(_mtp_to_llama(key, value, cfg) for key, value in head.items())
    del head
    plan: list[tuple[mx.array, Q, int]] = []
    for key in list(weights):
        key, value = _to_llama(key, weights.pop(key), cfg)
        # the nextn tensors are named already; TensorNameMap knows the rest
        tensor = key if key.startswith("blk.") else names.get_name(key, try_suffixes=(".weight", ".bias"))
        if tensor is None:
            raise ModelLoadError(f"{src}: tensor {key!r} has no counterpart in llama.cpp's {w.arch}")
        qtype = _tensor_type(tensor, value.shape, matrix_type)
        nbytes = _nbytes(value.shape, qtype)
        w.add_tensor_info(tensor, value.shape, np.dtype(np.float32), nbytes, raw_dtype=qtype)
        plan.append((value, qtype, nbytes))

    total = sum(nbytes for *_, nbytes in plan)
    params = sum(value.size for value, *_ in plan)
    check_free_space(out.parent, total)
    task = add_task(progress, f"gguf {name}", total) if progress is not None else None
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    with open(out, "ab") as f:  # the data section: each tensor at the next aligned offset
        plan.reverse()
        done = 0
        while plan:  # holds the only reference to each tensor
            value, qtype, nbytes = plan.pop()
            f.write(bytes(-f.tell() % w.data_alignment))
            _write_rows(f, value, qtype)
            done += nbytes
            if task is not None:
                progress.update(task, completed=done, info=f"{done / 1e9:.2f}/{total / 1e9:.2f} GB")
    return params


def _llama_quantize(src: Path, out: Path, file_type: FT, progress: Progress | None) -> None:
    try:
        import llama_cpp
    except ImportError:
        raise ConvertError(
            f"{out.name}: K-quants come from llama.cpp's quantizer; install it with pip install 'mlxqwen[llama]'"
        ) from None
    label = file_type.name.removeprefix("MOSTLY_")
    task = add_task(progress, f"quantize {label} (llama.cpp)", None) if progress is not None else None
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(file_type)
    llama_log = logging.getLogger("llama-cpp-python")  # llama.cpp logs every tensor it quantizes
    level = llama_log.level
    llama_log.setLevel(logging.ERROR)
    try:
        status = llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(params))
    finally:
        llama_log.setLevel(level)
    if status != 0:
        raise ConvertError(f"{out.name}: llama.cpp's quantizer failed (status {status}); see its messages above")
    if task is not None:
        progress.update(task, total=1, completed=1)


def _export(src: Path, out: Path, name: str, quant: str, progress: Progress | None, force: bool, mtp: bool) -> int:
    if quant not in QUANTS:
        raise ConvertError(f"--quant {quant}: not a GGUF type this converter writes (one of {', '.join(QUANTS)})")
    matrix_type, file_type, requantize = QUANTS[quant]
    with staged(out, force, src) as tmp:
        if requantize is None:
            return _write_gguf(src, tmp, name, matrix_type, file_type, progress, mtp)
        intermediate = tmp.with_name(f"{tmp.name}.{matrix_type.name}")
        try:
            params = _write_gguf(src, intermediate, name, matrix_type, file_type, progress, mtp)
            _llama_quantize(intermediate, tmp, requantize, progress)
        finally:
            intermediate.unlink(missing_ok=True)
    return params


def convert_to_gguf(
    src_dir: str | Path,
    out_path: str | Path,
    quant: str = "Q8_0",
    progress: Progress | None = None,
    force: bool = False,
    no_mtp: bool = False,
) -> Path:
    """Write the checkpoint at `src_dir` as one GGUF file at `out_path` that llama.cpp loads, with
    its MTP head unless `no_mtp`.

    The file appears only when complete; an existing one is replaced only with `force`."""
    src, out = Path(src_dir).expanduser(), Path(out_path).expanduser()
    _export(src, out, src.name, quant, progress, force, not no_mtp)
    return out


# The `gguf` output format of `mlxqwen convert` (see api.py).
OPTIONS: dict[str, dict[str, Any]] = {
    "quant": {"choices": list(QUANTS), "default": "Q8_0", "help": "GGUF tensor type (default Q8_0)"},
    "no_mtp": {"action": "store_true", "help": "leave the multi-token-prediction head (mtp.*) out"},
}


def label(quant: str = "Q8_0", **_: Any) -> str:
    return quant


def default_output(name: str, quant: str = "Q8_0", **_: Any) -> str:
    return f"{name}-{quant}.gguf"


def convert(
    source: Source,
    output: Path,
    *,
    force: bool = False,
    progress: Progress | None = None,
    quant: str = "Q8_0",
    no_mtp: bool = False,
) -> ConvertResult:
    start = time.perf_counter()
    output = Path(output).expanduser()
    params = _export(source.path, output, source.name, quant, progress, force, not no_mtp)
    size = output.stat().st_size  # tensors and the tokenizer (a few MB)
    return ConvertResult(output, quant, size, 8 * size / params, time.perf_counter() - start)
