"""Directories quantized by `mlx_lm.convert` load in mlxqwen and give mlx-lm's logits."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from checkpoints import build_multimodal_reference, build_reference, fuse_experts, save_checkpoint

import mlxqwen

mlx_lm = pytest.importorskip("mlx_lm")

TOKENS = [int(t) for t in np.random.RandomState(3).randint(0, 512, 16)]


def build(kind: str):
    if kind == "qwen3_5":
        return build_multimodal_reference()
    if kind == "qwen3_5_moe":
        return build_multimodal_reference(moe=True)
    return build_reference(kind)


@pytest.mark.parametrize("kind", ["qwen2", "qwen3", "qwen3_moe", "qwen3_5", "qwen3_5_moe"])
def test_mlx_lm_quantized_directory(tmp_path, kind):
    # transformers-4 style: mlx-lm ignores `rope_parameters` in qwen2 configs (wrong RoPE theta)
    style = "t5" if kind.startswith("qwen3_5") else "t4"
    src = save_checkpoint(build(kind), tmp_path / "hf", style=style)
    if kind == "qwen3_5_moe":
        fuse_experts(src)  # the layout mlx-lm expects for this family (as released by Qwen)
    out = tmp_path / "mlx"
    mlx_lm.convert(str(src), str(out), quantize=True, q_group_size=32, q_bits=4, dtype="float32")
    quant = json.loads((out / "config.json").read_text())["quantization"]
    if kind.endswith("moe"):
        assert any(isinstance(v, dict) for v in quant.values()), "expected per-module overrides"

    theirs, _ = mlx_lm.load(str(out))
    ours = mlxqwen.load(out, dtype=mx.float32)
    expected = np.array(theirs(mx.array([TOKENS]))[0])
    got = np.array(ours.model(mx.array([TOKENS]))[0])
    assert np.abs(got - expected).max() / np.abs(expected).max() < 1e-4
