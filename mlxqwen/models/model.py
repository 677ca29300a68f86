"""The Qwen decoder for every family: a stack of (attention or Gated DeltaNet) + (MLP or
MoE) layers. Module paths follow mlx-lm's, so mlx-lm's quantized checkpoints load as
they are and ours load in mlx-lm."""

from __future__ import annotations

import weakref
from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn

from ..cache import KVCache, LinearAttentionCache
from ..config import ModelConfig
from .attention import Attention, positions
from .gated_delta import GatedDeltaNet
from .moe import MLP, SparseMoeBlock, SwitchGLU, stack_experts

_COMPILED_TOKENS = 4  # a decode step, or a verify step of speculative decoding


def _compiled(module: nn.Module, method: str) -> Callable:
    """`module.method` compiled. The module's arrays are inputs of the compiled function, so it computes
    with the weights the module holds when called; the module is held weakly, so that one dropped is
    freed at once (not when the garbage collector finds the cycle)."""
    module_ref = weakref.ref(module)
    inputs: list[nn.Module] = []  # the module, while a call runs
    step = mx.compile(lambda *args: getattr(module_ref(), method)(*args), inputs=inputs)

    def call(*args):
        inputs.append(module_ref())
        try:
            return step(*args)
        finally:
            inputs.clear()

    return call


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int):
        super().__init__()
        self.is_linear = bool(cfg.layer_types) and cfg.layer_types[index] == "linear_attention"
        if self.is_linear:
            self.linear_attn = GatedDeltaNet(cfg)
        else:
            self.self_attn = Attention(cfg)
        self.mlp = SparseMoeBlock(cfg) if cfg.is_moe_layer(index) else MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)

        self._linear_step = _compiled(self, "_linear")
        self._attention_in_step = _compiled(self, "_attention_in")
        self._attention_out_step = _compiled(self, "_attention_out")

    def __call__(self, x: mx.array, cache=None) -> mx.array:
        # The shapes of a step over a few tokens (decode, verify) recur: such steps run compiled.
        few = x.shape[1] <= _COMPILED_TOKENS
        if self.is_linear:
            past, state = self.linear_attn.state(cache, x)
            every_step = cache is not None and cache.keep_steps
            h, conv_inputs, states = (self._linear_step if few else self._linear)(x, past, state, every_step)
            if cache is not None:
                cache.update(conv_inputs, states, self.linear_attn.kernel - 1)
            return h
        offset = positions(cache)
        if few and isinstance(offset, int):
            offset = mx.array(offset)  # an input of the compiled step, not a constant of it
        q, k, v, *gate = (self._attention_in_step if few else self._attention_in)(x, offset)
        out = self.self_attn.attend(q, k, v, cache)
        return (self._attention_out_step if few else self._attention_out)(x, out, *gate)

    def _linear(self, x: mx.array, past: mx.array, state: mx.array, every_step: bool = False):
        out, conv_inputs, states = self.linear_attn(self.input_layernorm(x), past, state, every_step)
        return self._mlp(x + out), conv_inputs, states

    def _attention_in(self, x: mx.array, offset: int | mx.array) -> tuple[mx.array, ...]:
        return self.self_attn.inputs(self.input_layernorm(x), offset)

    def _attention_out(self, x: mx.array, out: mx.array, *gate: mx.array) -> mx.array:
        return self._mlp(x + self.self_attn.output(out, *gate))

    def _mlp(self, h: mx.array) -> mx.array:
        return h + self.mlp(self.post_attention_layernorm(h))


class QwenModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = [DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers)]
        self.norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.hidden_size = cfg.hidden_size
        self.pipeline = None  # this rank's stage when the layers are split across processes (`distributed`)

    def __call__(self, tokens: mx.array, cache=None) -> mx.array:
        stage = self.pipeline
        h = self.embed_tokens(tokens) if stage is None else stage.receive(tokens, self, self.hidden_size)
        for layer, c in zip(self.layers, cache or [None] * len(self.layers), strict=True):
            h = layer(h, c)
        return self.norm(h) if stage is None else stage.send(h, self)


class CausalLM(nn.Module):
    """Qwen2 / Qwen3 / Qwen3-MoE, and the text model inside Qwen3.5."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = QwenModel(cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def __call__(self, tokens: mx.array, cache=None) -> mx.array:
        return self.head(self.model(tokens, cache))

    def hidden(self, tokens: mx.array, cache=None) -> mx.array:
        """The last layer's output after the final norm [B, T, H] (what `head` turns into logits)."""
        return self.model(tokens, cache)

    def head(self, h: mx.array) -> mx.array:
        if self.config.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(h)
        return self.lm_head(h)

    def embed(self, tokens: mx.array) -> mx.array:
        return self.model.embed_tokens(tokens)

    @property
    def layers(self) -> list[DecoderLayer]:
        return self.model.layers

    def make_cache(self) -> list:
        return [LinearAttentionCache() if layer.is_linear else KVCache() for layer in self.layers]

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Map Hugging Face (or mlx-lm) tensors onto this module tree."""
        weights = {k: v for k, v in weights.items() if "rotary_emb.inv_freq" not in k}
        if self.config.tie_word_embeddings:
            weights.pop("lm_head.weight", None)
        for i, layer in enumerate(self.layers):
            if isinstance(layer.mlp, SparseMoeBlock):
                stack_experts(weights, f"model.layers.{i}.mlp", self.config.num_experts)
        return weights


class Qwen3_5(nn.Module):
    """Qwen3.5 / Qwen3.6 (dense and MoE): hybrid Gated DeltaNet + gated attention.

    Wrapped in `language_model` like the multimodal checkpoints and mlx-lm; the vision tower is
    dropped on load, and so is the MTP head unless asked for (`mtp`, see `mtp.py`)."""

    # Decoder norms compute x̂·(1 + w) in Hugging Face checkpoints; we store 1 + w.
    _OFFSET_NORMS = (
        ".input_layernorm.weight",
        ".post_attention_layernorm.weight",
        "model.norm.weight",
        ".q_norm.weight",
        ".k_norm.weight",
    )

    def __init__(self, cfg: ModelConfig, mtp: bool = False):
        super().__init__()
        self.config = cfg
        self.language_model = CausalLM(cfg)
        if mtp:
            from .mtp import MTP

            self.mtp = MTP(cfg)

    def __call__(self, tokens: mx.array, cache=None) -> mx.array:
        return self.language_model(tokens, cache)

    def hidden(self, tokens: mx.array, cache=None) -> mx.array:
        return self.language_model.hidden(tokens, cache)

    def head(self, h: mx.array) -> mx.array:
        return self.language_model.head(h)

    def embed(self, tokens: mx.array) -> mx.array:
        return self.language_model.embed(tokens)

    @property
    def layers(self) -> list[DecoderLayer]:
        return self.language_model.layers

    def make_cache(self) -> list:
        return self.language_model.make_cache()

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        mtp = {k: v for k, v in weights.items() if k.startswith("mtp.")}
        out = {}
        for key, value in weights.items():
            if key.startswith(("mtp.", "model.visual", "visual.", "vision_tower")):
                continue
            if key.startswith("model.language_model."):
                key = "language_model.model." + key[len("model.language_model.") :]
            elif not key.startswith("language_model."):
                key = "language_model." + key
            out[key] = value
        # Hugging Face layout stores conv1d as [C, 1, K]; ours (and mlx-lm's) is [C, K, 1].
        from_hf = any(k.endswith("conv1d.weight") and v.shape[-1] != 1 for k, v in out.items())
        for key, value in out.items():
            if key.endswith("conv1d.weight") and value.shape[-1] != 1:
                out[key] = value.moveaxis(2, 1)
            elif from_hf and key.endswith(self._OFFSET_NORMS) and value.ndim == 1:
                out[key] = value.astype(mx.float32) + 1.0
        inner = {k[len("language_model.") :]: v for k, v in out.items()}
        out = {"language_model." + k: v for k, v in self.language_model.sanitize(inner).items()}
        if "mtp" in self:
            out.update(self._sanitize_mtp(mtp))
        return out

    def _sanitize_mtp(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """The head's tensors as Hugging Face names them (our converter keeps those names and norms)."""
        norms = (*self._OFFSET_NORMS, "pre_fc_norm_embedding.weight", "pre_fc_norm_hidden.weight", "mtp.norm.weight")
        out = {k: v.astype(mx.float32) + 1.0 if k.endswith(norms) and v.ndim == 1 else v for k, v in weights.items()}
        if self.config.num_experts:
            stack_experts(out, "mtp.layers.0.mlp", self.config.num_experts)
        return out


def build_model(cfg: ModelConfig, mtp: bool = False) -> nn.Module:
    """The model for `cfg`; with `mtp`, Qwen3.5's multi-token-prediction head too."""
    return Qwen3_5(cfg, mtp) if cfg.family == "qwen3_5" else CausalLM(cfg)


def fuse(model: nn.Module) -> None:
    """Fuse, in place, the projections that read the same input (see `fused`). The model's parameters
    then no longer match mlx-lm's files (a run's first projection holds the run): do it after loading
    the weights."""
    for module in model.modules():
        if isinstance(module, (Attention, GatedDeltaNet, MLP, SwitchGLU)):
            module.fuse()
