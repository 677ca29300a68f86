"""Tiny random Qwen checkpoints built with transformers, the reference for every test.

Every parameter is moved away from its initial value (norms, A_log, dt_bias, biases,
routers), so a loader that drops or misreads any tensor changes the logits."""

from __future__ import annotations

import io
import json
import math
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

FIXTURES = Path(__file__).parent / "fixtures"
TOKENIZER_DIR = FIXTURES / "qwen3-tokenizer"

_BASE = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=4096,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)
_MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
_LINEAR = dict(
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    linear_key_head_dim=16,
    linear_value_head_dim=8,
    linear_conv_kernel_dim=4,
    layer_types=["linear_attention", "linear_attention", "linear_attention", "full_attention"],
)

# arch -> (transformers config class, model class, defaults)
ARCHS = {
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", {**_MOE, "norm_topk_prob": True}),
    "qwen3_5_text": ("Qwen3_5TextConfig", "Qwen3_5ForCausalLM", _LINEAR),
    "qwen3_5_moe_text": (
        "Qwen3_5MoeTextConfig",
        "Qwen3_5MoeForCausalLM",
        {**_LINEAR, **_MOE, "shared_expert_intermediate_size": 48},
    ),
}


def _rope(arch: str, theta: float, scaling: dict | None) -> dict:
    params = {"rope_type": "default", "rope_theta": theta}
    if arch.startswith("qwen3_5"):
        # 2 * sum(mrope_section) must fit the rotary width (head_dim * 0.25 = 4 -> 2 pairs)
        params.update(partial_rotary_factor=0.25, mrope_section=[1, 1, 0], mrope_interleaved=True)
    if scaling:
        params.update(scaling)
    return params


def perturb(model: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if name.endswith("A_log"):
                p.copy_(torch.log(torch.rand(p.shape, generator=g) * 8 + 0.5))
            elif name.endswith("dt_bias"):
                p.copy_(noise * 0.5 + 1.0)
            elif p.ndim == 1:  # norms and biases
                p.add_(noise * 0.1)
            else:
                p.add_(noise * 0.02)


def build_reference(arch: str, seed: int = 0, rope_scaling: dict | None = None, **overrides):
    """A perturbed transformers model (fp32, eval mode) and its config."""
    import transformers

    config_cls, model_cls, defaults = ARCHS[arch]
    kwargs = {**_BASE, **defaults, **overrides}
    kwargs["rope_parameters"] = _rope(arch, kwargs.pop("rope_theta", 10000.0), rope_scaling)
    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(**kwargs)
    model = getattr(transformers, model_cls)(config).float().eval()
    perturb(model, seed)
    return model


def _to_transformers4_style(cfg: dict) -> dict:
    """Rewrite a transformers-5 config.json as transformers 4 wrote it."""
    cfg = dict(cfg)
    params = dict(cfg.pop("rope_parameters", None) or {})
    cfg["rope_theta"] = params.pop("rope_theta", 10000.0)
    if "partial_rotary_factor" in params:
        cfg["partial_rotary_factor"] = params.pop("partial_rotary_factor")
    rope_type = params.pop("rope_type", "default")
    if rope_type != "default":
        cfg["rope_scaling"] = {"type": rope_type, **params}
    elif params:
        cfg["rope_scaling"] = {"type": "mrope", **params}
    if "num_local_experts" in cfg:
        cfg["num_experts"] = cfg.pop("num_local_experts")
    cfg.pop("layer_types", None)  # transformers 4 derived them from full_attention_interval
    if "linear_num_key_heads" in cfg:
        cfg["full_attention_interval"] = 4
    return cfg


def save_checkpoint(model, path: Path, style: str = "t5", tokenizer: bool = True, shards: int = 1) -> Path:
    """Write the model as a Hugging Face directory (safetensors)."""
    path.mkdir(parents=True, exist_ok=True)
    total = sum(p.numel() * 4 for p in model.parameters())
    max_shard = f"{max(1, total // shards // 1000 + 1)}KB" if shards > 1 else "10GB"
    model.save_pretrained(path, max_shard_size=max_shard)
    if style == "t4":
        cfg = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps(_to_transformers4_style(cfg), indent=2))
    if tokenizer:
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            shutil.copy(TOKENIZER_DIR / name, path / name)
    return path


class MTPReference(torch.nn.Module):
    """Qwen3.5's multi-token-prediction head as llama.cpp runs it (transformers loads none): from the
    model's normed hidden state at t and the embedding of token t+1, through `fc` and one
    full-attention decoder layer, a normed hidden state whose logits guess token t+2."""

    def __init__(self, model, seed: int = 1):
        import importlib

        super().__init__()
        config = model.config
        modeling = importlib.import_module(type(model).__module__)
        prefix = type(model).__name__.removesuffix("ForCausalLM")
        norm = getattr(modeling, f"{prefix}RMSNorm")
        self.pre_fc_norm_embedding = norm(config.hidden_size, eps=config.rms_norm_eps)
        self.pre_fc_norm_hidden = norm(config.hidden_size, eps=config.rms_norm_eps)
        self.fc = torch.nn.Linear(2 * config.hidden_size, config.hidden_size, bias=False)
        full = config.layer_types.index("full_attention")
        self.layers = torch.nn.ModuleList([getattr(modeling, f"{prefix}DecoderLayer")(config, full)])
        self.norm = norm(config.hidden_size, eps=config.rms_norm_eps)
        self.apply(model._init_weights)  # as the model's own layers (a layer built alone is not initialized)
        self.float().eval()
        perturb(self, seed)
        self.model = [model]  # not a submodule: its weights are not the head's

    def forward(self, hidden: torch.Tensor, next_tokens: torch.Tensor) -> torch.Tensor:
        model = self.model[0]
        rope = model.model.rotary_emb(hidden, torch.arange(hidden.shape[1])[None, None])
        embedded = model.model.embed_tokens(next_tokens)
        x = torch.cat([self.pre_fc_norm_embedding(embedded), self.pre_fc_norm_hidden(hidden)], dim=-1)
        return self.norm(self.layers[0](self.fc(x), position_embeddings=rope))


def add_mtp_head(path: Path, head: MTPReference) -> Path:
    """Write `head` into the checkpoint at `path` as Qwen3.5 releases store it (`mtp.*`)."""
    from safetensors.torch import load_file, save_file

    file = path / "model.safetensors"
    tensors = load_file(file)
    tensors.update({f"mtp.{k}": v.contiguous() for k, v in head.state_dict().items()})
    save_file(tensors, file, metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    config["mtp_num_hidden_layers"] = 1
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path


def reference_draft(
    model, head: MTPReference, tokens: list[int], depth: int, recent: int | None = None
) -> tuple[int, list[int]]:
    """The model's greedy next token after `tokens`, and the head's `depth` greedy guesses at the
    tokens after it, chained: each guess is read with the head's own output at the step before.
    recent: the head reads only that many last positions (their model's hidden states are still
    those of the whole sequence)."""
    with torch.no_grad():
        hidden = model.model(torch.tensor([tokens])).last_hidden_state
        following = [*tokens[1:], int(model.lm_head(hidden[0, -1]).argmax())]
        if recent is not None:
            hidden, tokens, following = hidden[:, -recent:], tokens[-recent:], following[-recent:]
        for _ in range(depth):
            out = head(hidden, torch.tensor([following]))[:, -1:]
            following.append(int(model.lm_head(out[0, -1]).argmax()))
            hidden = torch.cat([hidden, out], dim=1)
    return following[len(tokens) - 1], following[len(tokens) :]


def reference_logits(model, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].float()


_VISION = dict(
    depth=1,
    hidden_size=32,
    intermediate_size=32,
    num_heads=2,
    out_hidden_size=64,
    patch_size=4,
    temporal_patch_size=2,
    spatial_merge_size=2,
    num_position_embeddings=16,
)


def build_multimodal_reference(moe: bool = False, seed: int = 0):
    """Qwen3.5 / Qwen3.5-MoE in the `...ForConditionalGeneration` layout (vision tower included)."""
    import transformers

    arch = "qwen3_5_moe_text" if moe else "qwen3_5_text"
    text = {**_BASE, **ARCHS[arch][2], "rope_parameters": _rope(arch, 10000.0, None)}
    prefix = "Qwen3_5Moe" if moe else "Qwen3_5"
    config = getattr(transformers, f"{prefix}Config")(text_config=text, vision_config=_VISION)
    torch.manual_seed(seed)
    model = getattr(transformers, f"{prefix}ForConditionalGeneration")(config).float().eval()
    perturb(model, seed)
    return model


def fuse_experts(path: Path, prefix: str = "model.layers") -> None:
    """Rewrite per-expert tensors into the fused 3-D layout (`experts.gate_up_proj`, `experts.down_proj`)
    that Qwen3.5-MoE releases use."""
    from safetensors.torch import load_file, save_file

    file = path / "model.safetensors"
    tensors = load_file(file)
    groups: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for key in [k for k in tensors if ".mlp.experts." in k]:
        head, rest = key.split(".mlp.experts.")
        expert, proj, _ = rest.split(".")
        groups.setdefault(head, {}).setdefault(int(expert), {})[proj] = tensors.pop(key)
    for head, experts in groups.items():
        ordered = [experts[e] for e in sorted(experts)]
        tensors[f"{head}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([e["gate_proj"], e["up_proj"]]) for e in ordered]
        )
        tensors[f"{head}.mlp.experts.down_proj"] = torch.stack([e["down_proj"] for e in ordered])
    save_file(tensors, file)


def to_fp8(path: Path, block: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Rewrite the checkpoint's layer projections as Qwen's FP8 releases store them (e4m3 with a bf16
    inverse scale per block); returns the dequantized weights a converter must see."""
    file = path / "model.safetensors"
    tensors = load_file(file)
    dequantized = {}
    for key in [k for k in tensors if ".layers." in k and k.endswith("proj.weight")]:
        w = tensors[key].float()
        m, n = w.shape
        rows, cols = math.ceil(m / block[0]), math.ceil(n / block[1])
        padded = torch.nn.functional.pad(w, (0, cols * block[1] - n, 0, rows * block[0] - m))
        amax = padded.reshape(rows, block[0], cols, block[1]).abs().amax(dim=(1, 3))
        scale = (amax / 448).to(torch.bfloat16)
        full = scale.float().repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[:m, :n]
        fp8 = (w / full).to(torch.float8_e4m3fn)
        tensors[key], tensors[key + "_scale_inv"] = fp8, scale
        dequantized[key] = fp8.float() * full
    save_file(tensors, file, metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": list(block),
    }
    (path / "config.json").write_text(json.dumps(config))
    return dequantized


def to_gguf(src: Path, out: Path, quant: str = "F32") -> Path:
    """The checkpoint at `src` written to `out` by `mlxqwen convert --to gguf`, quietly."""
    from mlxqwen.convert import convert
    from mlxqwen.convert.progress import make_progress
    from rich.console import Console

    with make_progress(Console(file=io.StringIO())) as progress:
        return convert(src, out, to="gguf", quant=quant, progress=progress).output
