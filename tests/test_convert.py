"""The converter's MLX output: exact quantized tensors, every architecture, loads in mlxqwen and mlx-lm."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from checkpoints import (
    TOKENIZER_DIR,
    build_multimodal_reference,
    build_reference,
    fuse_experts,
    reference_logits,
    save_checkpoint,
    to_fp8,
)
from mlxqwen.convert import convert
from mlxqwen.convert.calibration import TEXT
from safetensors.torch import load_file, save_file

import mlxqwen
from mlxqwen.checkpoint import read_config, read_weights
from mlxqwen.config import parse_config
from mlxqwen.models import build_model

TOKENS = [int(t) for t in np.random.RandomState(5).randint(0, 512, 20)]
ARCHS = ["qwen2", "qwen3", "qwen3_moe", "qwen3_5_text", "qwen3_5_moe_text", "qwen3_5", "qwen3_5_moe"]


def build(arch: str, **overrides):
    if arch in ("qwen3_5", "qwen3_5_moe"):
        return build_multimodal_reference(moe=arch == "qwen3_5_moe")
    return build_reference(arch, **overrides)


def hf_checkpoint(arch: str, path: Path, **overrides) -> tuple[torch.nn.Module, Path]:
    ref = build(arch, **overrides)
    src = save_checkpoint(ref, path)
    if arch == "qwen3_5_moe":
        fuse_experts(src)  # released Qwen3.5-MoE checkpoints store experts fused
    return ref, src


def small_tokenizer(path: Path, qwen_pre_tokenizer: bool = False) -> None:
    """Replace the checkpoint's tokenizer by a byte-level BPE of under 512 tokens, so that a tiny
    vocabulary covers the calibration text and the quality report stays fast; with
    `qwen_pre_tokenizer`, splitting words as Qwen's does, so that llama.cpp recognises it (GGUF)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=480,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
    )
    tok.train_from_iterator([TEXT], trainer)
    tok.save(str(path / "tokenizer.json"))
    if qwen_pre_tokenizer:
        tokenizer = json.loads((path / "tokenizer.json").read_text())
        tokenizer["pre_tokenizer"] = json.loads((TOKENIZER_DIR / "tokenizer.json").read_text())["pre_tokenizer"]
        (path / "tokenizer.json").write_text(json.dumps(tokenizer))


def add_mtp(path: Path, hidden: int = 64) -> None:
    """Give a Qwen3.5 checkpoint an MTP head laid out like Qwen's (`mtp.*`): a copy of the last
    (full-attention) layer, the fc that joins embedding and hidden state, and its norms."""
    file = path / "model.safetensors"
    tensors = load_file(file)
    layer = "model.language_model.layers.3."
    for key in [k for k in tensors if k.startswith(layer)]:
        tensors["mtp.layers.0." + key[len(layer) :]] = tensors[key].clone()
    g = torch.Generator().manual_seed(7)
    tensors["mtp.fc.weight"] = torch.randn(hidden, 2 * hidden, generator=g) * 0.02
    for name in ("norm", "pre_fc_norm_embedding", "pre_fc_norm_hidden"):
        tensors[f"mtp.{name}.weight"] = torch.randn(hidden, generator=g) * 0.1
    save_file(tensors, file, metadata={"format": "pt"})


def sanitized_source(src: Path) -> dict[str, mx.array]:
    """The source's decoder tensors through the core's own (whole-checkpoint) sanitize."""
    model = build_model(parse_config(read_config(src)))
    return model.sanitize(read_weights(src)[0])


def output_tensors(out: Path) -> dict[str, mx.array]:
    return read_weights(out)[0]


def rel_err(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float32), np.asarray(b, dtype=np.float32)
    return float(np.abs(a - b).max() / np.abs(b).max())


def logits(model, tokens=TOKENS) -> np.ndarray:
    return np.array(model(mx.array([tokens]))[0].astype(mx.float32))


@pytest.mark.parametrize("arch", ARCHS)
def test_tensors_exact_and_both_loaders_agree(tmp_path, arch):
    ref, src = hf_checkpoint(arch, tmp_path / "hf")
    out = tmp_path / "out"
    result = convert(src, out, recipe="4bit", group_size=32)

    expected = sanitized_source(src)
    written = output_tensors(out)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"] == {"group_size": 32, "bits": 4, "mode": "affine"}  # no overrides in 4bit
    quantized = {k.removesuffix(".scales") for k in written if k.endswith(".scales")}
    for name, source in expected.items():
        path = name.removesuffix(".weight")
        if path in quantized:
            # bit-identical to mx.quantize of the source tensor (fp32 source, fp32 output dtype)
            for got, want in zip(
                (written[f"{path}.weight"], written[f"{path}.scales"], written[f"{path}.biases"]),
                mx.quantize(source, 32, 4),
                strict=True,
            ):
                assert got.dtype == want.dtype and mx.array_equal(got, want), name
        else:
            assert mx.array_equal(written[name], source), name
    assert set(written) == {k for p in quantized for k in (f"{p}.weight", f"{p}.scales", f"{p}.biases")} | (
        set(expected) - {f"{p}.weight" for p in quantized}
    )

    # what stays unquantized: routers, shared-expert gates, Gated DeltaNet's a/b projections
    assert not any(
        p.endswith((".mlp.gate", ".shared_expert_gate", "in_proj_a", "in_proj_b", "conv1d")) for p in quantized
    )
    assert any(p.endswith("embed_tokens") for p in quantized)
    if "moe" in arch:
        assert any(p.endswith("switch_mlp.down_proj") for p in quantized)
        assert any(k.endswith("mlp.gate.weight") for k in written)

    ours = mlxqwen.load(out, dtype=mx.float32)
    got = logits(ours.model)
    if arch not in ("qwen3_5", "qwen3_5_moe"):  # transformers' multimodal classes need image inputs
        want = reference_logits(ref, TOKENS).numpy()
        assert rel_err(got, want) < 0.5  # 4-bit random weights: close, not equal (8-bit test is tight)
    mlx_lm = pytest.importorskip("mlx_lm")
    theirs, _ = mlx_lm.load(str(out))
    assert rel_err(got, logits(theirs)) < 1e-5
    assert result.bits_per_weight == pytest.approx(8 * result.size_bytes / sum(v.size for v in expected.values()))


def test_attention_every_third_layer_loads_in_mlx_lm(tmp_path):
    """The demo's layout: transformers 5 writes only `layer_types`, mlx-lm reads only the interval."""
    types = ["linear_attention", "linear_attention", "full_attention"] * 2
    _, src = hf_checkpoint("qwen3_5_text", tmp_path / "hf", num_hidden_layers=6, layer_types=types)
    out = tmp_path / "out"
    convert(src, out, recipe="4bit", group_size=32)
    assert json.loads((out / "config.json").read_text())["text_config"]["full_attention_interval"] == 3
    mlx_lm = pytest.importorskip("mlx_lm")
    assert rel_err(logits(mlxqwen.load(out, dtype=mx.float32).model), logits(mlx_lm.load(str(out))[0])) < 1e-5


@pytest.mark.parametrize("arch", ["qwen3", "qwen3_5_moe_text"])
def test_8bit_logits_close_to_transformers(tmp_path, arch):
    ref, src = hf_checkpoint(arch, tmp_path / "hf")
    convert(src, tmp_path / "out", recipe="8bit", group_size=32)
    got = logits(mlxqwen.load(tmp_path / "out", dtype=mx.float32).model)
    assert rel_err(got, reference_logits(ref, TOKENS).numpy()) < 0.02


@pytest.mark.parametrize("arch", ["qwen3", "qwen3_5"])
def test_same_tensors_as_mlx_lm_convert(tmp_path, arch):
    """Every tensor both converters write is bit-identical; the only difference is what we keep
    unquantized on purpose."""
    mlx_lm = pytest.importorskip("mlx_lm")
    _, src = hf_checkpoint(arch, tmp_path / "hf")
    convert(src, tmp_path / "ours", recipe="4bit", group_size=32)
    mlx_lm.convert(str(src), str(tmp_path / "theirs"), quantize=True, q_group_size=32, q_bits=4)
    ours, theirs = output_tensors(tmp_path / "ours"), output_tensors(tmp_path / "theirs")
    differ = {k.removesuffix(".scales") for k in ours.keys() ^ theirs.keys() if k.endswith(".scales")}
    assert all(p.endswith(("in_proj_a", "in_proj_b")) for p in differ), differ
    assert bool(differ) == arch.startswith("qwen3_5")
    assert {k.rsplit(".", 1)[0] for k in ours.keys() ^ theirs.keys()} == differ
    for name in ours.keys() & theirs.keys():
        if name.rsplit(".", 1)[0] not in differ:
            assert ours[name].dtype == theirs[name].dtype and mx.array_equal(ours[name], theirs[name]), name


def test_bfloat16_output_quantizes_the_cast_tensor(tmp_path):
    _, src = hf_checkpoint("qwen3_5_text", tmp_path / "hf")
    convert(src, tmp_path / "out", recipe="4bit", group_size=64, dtype="bfloat16")
    expected, written = sanitized_source(src), output_tensors(tmp_path / "out")
    path = "language_model.model.layers.0.linear_attn.in_proj_qkv"
    want = mx.quantize(expected[f"{path}.weight"].astype(mx.bfloat16), 64, 4)
    assert all(
        mx.array_equal(a, b)
        for a, b in zip((written[f"{path}.{k}"] for k in ("weight", "scales", "biases")), want, strict=True)
    )
    assert written[f"{path}.scales"].dtype == mx.bfloat16
    norm = "language_model.model.layers.0.input_layernorm.weight"
    assert written[norm].dtype == mx.bfloat16
    assert mx.array_equal(written[norm], expected[norm].astype(mx.bfloat16))
    # A_log keeps its precision (the decay exponent)
    assert written["language_model.model.layers.0.linear_attn.A_log"].dtype == mx.float32
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "qwen3_5" and config["text_config"]["model_type"] == "qwen3_5_text"
    assert config["text_config"]["dtype"] == "bfloat16"
    mlxqwen.load(tmp_path / "out")


def test_mixed_recipe_overrides(tmp_path):
    _, src = hf_checkpoint("qwen3", tmp_path / "hf", num_hidden_layers=8)
    out = tmp_path / "out"
    convert(src, out, recipe="mixed_4_8", group_size=32)
    quant = json.loads((out / "config.json").read_text())["quantization"]
    high = {k for k, v in quant.items() if isinstance(v, dict)}
    assert all(quant[k] == {"group_size": 32, "bits": 8, "mode": "affine"} for k in high)
    # 8 layers: first and last eighth (layers 0 and 7) and every third in between (3, 6)
    layers = [0, 3, 6, 7]
    expected = {"model.embed_tokens", "lm_head"} | {
        f"model.layers.{i}.{m}" for i in layers for m in ("self_attn.v_proj", "mlp.down_proj")
    }
    assert high == expected
    written = output_tensors(out)
    assert written["model.layers.0.mlp.down_proj.weight"].shape[-1] == 96 * 8 // 32
    assert written["model.layers.1.mlp.down_proj.weight"].shape[-1] == 96 * 4 // 32
    ours = logits(mlxqwen.load(out, dtype=mx.float32).model)
    mlx_lm = pytest.importorskip("mlx_lm")
    assert rel_err(ours, logits(mlx_lm.load(str(out))[0])) < 1e-5


@pytest.mark.parametrize("moe", [False, True])
def test_mtp_kept_vision_dropped_or_copied(tmp_path, moe):
    arch = "qwen3_5_moe" if moe else "qwen3_5"
    ref = build(arch)
    src = save_checkpoint(ref, tmp_path / "hf")
    add_mtp(src)
    if moe:
        fuse_experts(src)
    convert(src, tmp_path / "text", recipe="4bit", group_size=32)
    written = output_tensors(tmp_path / "text")
    raw = read_weights(src)[0]
    assert not any(k.startswith(("model.visual", "visual")) for k in written)
    assert "vision_config" not in json.loads((tmp_path / "text" / "config.json").read_text())
    mtp = {k for k in written if k.startswith("mtp.")}
    assert "mtp.fc.scales" in mtp and "mtp.layers.0.self_attn.q_proj.scales" in mtp
    assert mx.array_equal(written["mtp.norm.weight"], raw["mtp.norm.weight"])  # Hugging Face convention kept
    assert mx.array_equal(written["mtp.fc.weight"], mx.quantize(raw["mtp.fc.weight"], 32, 4)[0])
    if moe:  # experts stacked like the decoder's; the router stays unquantized
        assert written["mtp.layers.0.mlp.switch_mlp.up_proj.scales"].shape[0] == 4
        assert "mtp.layers.0.mlp.gate.weight" in written and "mtp.layers.0.mlp.gate.scales" not in written
    else:
        assert "mtp.layers.0.mlp.down_proj.scales" in mtp
    a = logits(mlxqwen.load(tmp_path / "text", dtype=mx.float32).model)

    convert(src, tmp_path / "vision", recipe="4bit", group_size=32, vision=True)
    written = output_tensors(tmp_path / "vision")
    visual = {k: v for k, v in raw.items() if k.startswith("model.visual.")}
    assert visual and all(mx.array_equal(written[k], v) for k, v in visual.items())  # unquantized, as stored
    assert "vision_config" in json.loads((tmp_path / "vision" / "config.json").read_text())
    b = logits(mlxqwen.load(tmp_path / "vision", dtype=mx.float32).model)
    assert np.array_equal(a, b)
    mlx_lm = pytest.importorskip("mlx_lm")
    assert rel_err(a, logits(mlx_lm.load(str(tmp_path / "vision"))[0])) < 1e-5


@pytest.mark.parametrize("block", [(128, 128), (32, 48)])
def test_fp8_source_is_dequantized(tmp_path, block):
    ref, src = hf_checkpoint("qwen3", tmp_path / "hf")
    dequantized = to_fp8(src, block)
    convert(src, tmp_path / "plain", recipe="none")
    convert(src, tmp_path / "q8", recipe="8bit", group_size=32)
    plain, q8 = output_tensors(tmp_path / "plain"), output_tensors(tmp_path / "q8")
    for key, want in dequantized.items():
        want = mx.array(want.numpy())
        assert mx.array_equal(plain[key], want), key
        path = key.removesuffix(".weight")
        assert mx.array_equal(q8[f"{path}.weight"], mx.quantize(want, 32, 8)[0]), key
    config = json.loads((tmp_path / "q8" / "config.json").read_text())
    assert config["quantization_config"] == config["quantization"]  # the FP8 section is gone
    # the model transformers runs with the FP8-rounded weights
    ref.load_state_dict(dequantized, strict=False)
    want = reference_logits(ref, TOKENS).numpy()
    assert rel_err(logits(mlxqwen.load(tmp_path / "plain", dtype=mx.float32).model), want) < 1e-4
    assert rel_err(logits(mlxqwen.load(tmp_path / "q8", dtype=mx.float32).model), want) < 0.02


def test_shards_and_index(tmp_path):
    _, src = hf_checkpoint("qwen3_moe", tmp_path / "hf")
    out = tmp_path / "out"
    limit = 30_000
    result = convert(src, out, recipe="4bit", group_size=32, shard_size=limit / 2**30)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(files) > 3 and files == sorted(set(index["weight_map"].values()))
    assert all(f.startswith("model-") and f.endswith(f"-of-{len(files):05d}.safetensors") for f in files)
    for f in files:  # full shards, except that a tensor larger than the limit gets a shard of its own
        shard = mx.load(str(out / f))
        assert sum(v.nbytes for v in shard.values()) <= limit or len(shard) == 1
    assert index["metadata"]["total_size"] == result.size_bytes
    assert set(index["weight_map"]) == set(output_tensors(out))
    ours = logits(mlxqwen.load(out, dtype=mx.float32).model)
    mlx_lm = pytest.importorskip("mlx_lm")
    assert rel_err(ours, logits(mlx_lm.load(str(out))[0])) < 1e-5


def test_quality_report(tmp_path):
    _, src = hf_checkpoint("qwen3_5_text", tmp_path / "hf")
    small_tokenizer(src)
    same = convert(src, tmp_path / "none", recipe="none", eval=True).quality
    assert same.kl == pytest.approx(0, abs=1e-6) and same.top1 == pytest.approx(1.0)
    assert same.ppl_converted == pytest.approx(same.ppl_source)
    assert same.tokens > 500
    q8 = convert(src, tmp_path / "q8", recipe="8bit", group_size=32, eval=True).quality
    q2 = convert(src, tmp_path / "q2", recipe="2bit", group_size=32, eval=True).quality
    assert 0 < q8.kl < q2.kl and q8.top1 > q2.top1
    assert q8.ppl_source == pytest.approx(same.ppl_source)
    card = (tmp_path / "q8" / "README.md").read_text()
    assert f"{q8.kl:.4f}" in card and f"{q8.top1:.1%}" in card and "8-bit" in card
