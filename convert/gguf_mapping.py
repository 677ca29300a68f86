"""How a Qwen checkpoint maps onto llama.cpp's GGUF: the architecture (or a one-line error for
what llama.cpp can't run), the metadata, the tokenizer (byte-level BPE as llama.cpp's `gpt2`
model, with Qwen's pre-tokenizer and chat template), and each tensor's name, layout and type.

Tensors come in the canonical form `reader.SourceCheckpoint` gives (Qwen3.5 decoder norms
already hold 1 + w, conv1d is [C, K, 1]); names are the ones gguf-py's TensorNameMap knows."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import mlx.core as mx
import numpy as np

from mlxqwen.config import ModelConfig
from mlxqwen.errors import ConvertError

Q = gguf.GGMLQuantizationType

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

    def unsupported(what: str) -> ConvertError:
        return ConvertError(f"{source}: {what}; llama.cpp's {gguf.MODEL_ARCH_NAMES[arch]} cannot run it")

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
        raise ConvertError(
            f"{source}: mrope_section {sections} needs {2 * sum(sections)} rotary dims, "
            f"head_dim × partial_rotary_factor gives {rotary}"
        )
    return (sections + [0, 0, 0, 0])[:4]


def write_metadata(
    w: gguf.GGUFWriter, cfg: ModelConfig, arch: gguf.MODEL_ARCH, name: str, source: str, mtp_layers: int = 0
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


def write_tokenizer(w: gguf.GGUFWriter, src: Path, vocab_size: int) -> None:
    """The byte-level BPE as llama.cpp's `gpt2` model: tokens padded to the model's vocab size."""
    file = src / "tokenizer.json"
    if not file.is_file():
        raise ConvertError(f"{file}: not found; GGUF export needs the model's tokenizer")
    tokenizer = json.loads(file.read_text(encoding="utf-8"))
    bpe = tokenizer.get("model") or {}
    if bpe.get("type") != "BPE":
        raise ConvertError(f"{file}: expected a byte-level BPE tokenizer (Qwen's), got {bpe.get('type')!r}")
    pre = _PRE_TOKENIZERS.get(_split_regex(tokenizer) or "")
    if pre is None:
        raise ConvertError(f"{file}: pre-tokenizer regex is not Qwen2's or Qwen3.5's, which llama.cpp knows")

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
            raise ConvertError(f"{file}: token {text!r} has id {i}, beyond the model's vocab_size {vocab_size}")
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


def to_llama(key: str, value: mx.array, cfg: ModelConfig) -> tuple[str, mx.array]:
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


def importance_to_llama(key: str, importance: mx.array, cfg: ModelConfig) -> mx.array:
    """The importance of the input columns of the matrix `key` ([in], or [experts, in]) in the
    column order `to_llama` gives the matrix."""
    if ".linear_attn.out_proj." in key and cfg.linear_num_value_heads != cfg.linear_num_key_heads:
        importance = mx.take(importance, _tiled_v_heads(0, cfg, cfg.linear_value_head_dim), axis=-1)
    return importance


def mtp_layers(head: dict[str, mx.array]) -> int:
    """The decoder layers of an MTP head (its `mtp.layers.N.*` tensors)."""
    return len({k.split(".")[2] for k in head if k.startswith("mtp.layers.")})


def mtp_to_llama(key: str, value: mx.array, cfg: ModelConfig) -> tuple[str, mx.array]:
    """One tensor of the MTP head (Hugging Face names) as llama.cpp's qwen35 defines it: head layer
    i is block n_layer + i (a decoder layer, named as the decoder's, for `to_llama`), the head's
    own tensors are that block's nextn tensors (named in full). Every norm of the head computes
    x̂·(1 + w), as the decoder's do, so it holds 1 + w."""
    if "norm" in key and value.ndim == 1:
        value = value.astype(mx.float32) + 1.0
    _, part, rest = key.split(".", 2)
    if part == "layers":
        layer, rest = rest.split(".", 1)
        return f"model.layers.{cfg.num_hidden_layers + int(layer)}.{rest}", value
    if part in _NEXTN and rest == "weight":
        return f"{gguf.TENSOR_NAMES[_NEXTN[part]].format(bid=cfg.num_hidden_layers)}.weight", value
    return key, value  # no counterpart: the writer says so


def tensor_type(name: str, shape: tuple[int, ...], matrix_type: Q) -> Q:
    if len(shape) == 1 or not name.endswith(".weight") or name.endswith("_norm.weight"):
        return Q.F32
    if name.split(".")[-2] in _F32_MATRICES:
        return Q.F32
    block, _ = gguf.GGML_QUANT_SIZES[matrix_type]
    return Q.F16 if shape[-1] % block else matrix_type  # llama.cpp's converter falls back the same way
