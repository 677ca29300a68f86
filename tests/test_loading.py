"""Checkpoint layouts and formats that `mlxqwen.load` accepts, and the errors it gives."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
import torch
from checkpoints import build_multimodal_reference, build_reference, fuse_experts, reference_logits, save_checkpoint
from safetensors.torch import load_file, save_file

import mlxqwen
from mlxqwen import ModelLoadError

TOKENS = [int(t) for t in np.random.RandomState(2).randint(0, 512, 16)]


def rel_err(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


def logits(llm, tokens=TOKENS) -> np.ndarray:
    return np.array(llm.model(mx.array([tokens]))[0].astype(mx.float32))


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory):
    ref = build_reference("qwen3")
    return ref, save_checkpoint(ref, tmp_path_factory.mktemp("qwen3"))


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_conditional_generation_layout_skips_vision_and_mtp(tmp_path, moe):
    ref = build_multimodal_reference(moe=moe)
    path = save_checkpoint(ref, tmp_path / "ckpt")
    mtp = {"mtp.fc.weight": torch.randn(64, 128), "mtp.norm.weight": torch.randn(64)}
    save_file(mtp, path / "mtp.safetensors")
    llm = mlxqwen.load(path, dtype=mx.float32)
    assert llm.config.model_type == ("qwen3_5_moe" if moe else "qwen3_5")
    assert rel_err(logits(llm), reference_logits(ref, TOKENS)) < 1e-4


def test_sharded_checkpoint(tmp_path):
    ref = build_reference("qwen3_5_text")
    path = save_checkpoint(ref, tmp_path / "ckpt", shards=4)
    assert len(list(path.glob("*.safetensors"))) > 2 and (path / "model.safetensors.index.json").exists()
    assert rel_err(logits(mlxqwen.load(path, dtype=mx.float32)), reference_logits(ref, TOKENS)) < 1e-4


@pytest.mark.parametrize("torch_dtype", [torch.bfloat16, torch.float16])
def test_half_precision_weights(tmp_path, torch_dtype):
    ref = build_reference("qwen3_5_text").to(torch_dtype)
    path = save_checkpoint(ref, tmp_path / "ckpt")
    expected = reference_logits(ref.float(), TOKENS)  # the same rounded weights, computed in fp32
    assert rel_err(logits(mlxqwen.load(path, dtype=mx.float32)), expected) < 1e-4


def test_fused_expert_tensors(tmp_path):
    ref = build_reference("qwen3_5_moe_text")
    path = save_checkpoint(ref, tmp_path / "ckpt")
    fuse_experts(path)
    assert rel_err(logits(mlxqwen.load(path, dtype=mx.float32)), reference_logits(ref, TOKENS)) < 1e-4


def test_dtype_option_keeps_decay_in_fp32(qwen3_dir, tmp_path):
    ref = build_reference("qwen3_5_text")
    llm = mlxqwen.load(save_checkpoint(ref, tmp_path / "ckpt"), dtype=mx.bfloat16)
    attn = llm.model.layers[0].linear_attn
    assert attn.in_proj_qkv.weight.dtype == mx.bfloat16
    assert attn.A_log.dtype == mx.float32
    assert rel_err(logits(llm), reference_logits(ref, TOKENS)) < 0.1


def test_tokenizer_and_config_are_exposed(qwen3_dir):
    _, path = qwen3_dir
    llm = mlxqwen.load(path)
    assert llm.tokenizer.decode(llm.tokenizer.encode("Hello, Qwen!")) == "Hello, Qwen!"
    assert llm.config.family == "qwen3" and llm.config.num_hidden_layers == 4


# --- errors: one clear message naming the file or field ---------------------------------


def broken_copy(src, dst, edit):
    shutil.copytree(src, dst)
    edit(dst)
    with pytest.raises(ModelLoadError) as err:
        mlxqwen.load(dst)
    return str(err.value)


def edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    for key in [k for k, v in changes.items() if v is None]:
        del cfg[key]
    (path / "config.json").write_text(json.dumps(cfg))


def test_unknown_model_type(qwen3_dir, tmp_path):
    msg = broken_copy(qwen3_dir[1], tmp_path / "x", lambda p: edit_config(p, model_type="llama"))
    assert "config.json" in msg and "'llama'" in msg


def test_missing_model_type(qwen3_dir, tmp_path):
    msg = broken_copy(qwen3_dir[1], tmp_path / "x", lambda p: edit_config(p, model_type=None))
    assert "config.json" in msg and "model_type" in msg


def test_shape_mismatch_names_tensor_and_file(qwen3_dir, tmp_path):
    msg = broken_copy(qwen3_dir[1], tmp_path / "x", lambda p: edit_config(p, intermediate_size=128))
    assert "model.safetensors" in msg and "mlp" in msg and "shape" in msg


def test_missing_tensor(qwen3_dir, tmp_path):
    def drop(p):
        t = load_file(p / "model.safetensors")
        del t["model.layers.1.self_attn.k_norm.weight"]
        save_file(t, p / "model.safetensors")

    msg = broken_copy(qwen3_dir[1], tmp_path / "x", drop)
    assert "model.layers.1.self_attn.k_norm.weight" in msg and "missing" in msg


def test_truncated_shard(qwen3_dir, tmp_path):
    def truncate(p):
        f = p / "model.safetensors"
        f.write_bytes(f.read_bytes()[:-1000])

    msg = broken_copy(qwen3_dir[1], tmp_path / "x", truncate)
    assert "model.safetensors" in msg and "truncated" in msg


def test_missing_shard(tmp_path):
    src = save_checkpoint(build_reference("qwen3"), tmp_path / "src", shards=3)
    victim = sorted(src.glob("*.safetensors"))[1].name
    msg = broken_copy(src, tmp_path / "x", lambda p: (p / victim).unlink())
    assert victim in msg and "missing" in msg


def test_missing_config(qwen3_dir, tmp_path):
    msg = broken_copy(qwen3_dir[1], tmp_path / "x", lambda p: (p / "config.json").unlink())
    assert "config.json" in msg


def test_not_a_directory(tmp_path):
    with pytest.raises(ModelLoadError, match="nope"):
        mlxqwen.load(tmp_path / "nope")


def test_loading_never_holds_the_checkpoint_twice(tmp_path):
    ref = build_reference("qwen3_5_moe_text", vocab_size=8192, hidden_size=256, intermediate_size=512)
    path = save_checkpoint(ref, tmp_path / "ckpt")
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    mx.clear_cache()
    mx.reset_peak_memory()
    llm = mlxqwen.load(path, dtype=mx.float32)
    assert mx.get_peak_memory() < 1.25 * size
    del llm
