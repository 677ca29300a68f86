"""Memory estimates against what MLX actually allocates, the published Qwen3.6-27B figures,
loading that refuses what cannot fit, and `mlxqwen fit`."""

from __future__ import annotations

import mlx.core as mx
import pytest
import torch
from checkpoints import build_reference, save_checkpoint

import mlxqwen
from mlxqwen import InsufficientMemoryError, memory
from mlxqwen.cache import KVCache, LinearAttentionCache, QuantizedKVCache
from mlxqwen.cli import main
from mlxqwen.config import parse_config
from mlxqwen.loader import load_model

GiB = 1024**3


@pytest.fixture(scope="module")
def hybrid_dir(tmp_path_factory):
    ref = build_reference("qwen3_5_text", head_dim=32, max_position_embeddings=65536).to(torch.bfloat16)
    return save_checkpoint(ref, tmp_path_factory.mktemp("hybrid"))


def test_estimates_match_allocations(hybrid_dir):
    model, cfg = load_model(hybrid_dir, dtype=mx.float32, lazy=True)
    weights = memory.weight_bytes(model)
    before = mx.get_active_memory()
    mx.eval(model.parameters())
    assert mx.get_active_memory() - before == pytest.approx(weights, rel=0.02)
    assert weights > 1.9 * sum(f.stat().st_size for f in hybrid_dir.glob("*.safetensors"))  # bf16 read as fp32

    for kv_bits in (None, 8, 4):
        cache = model.make_cache()
        if kv_bits:
            cache = [QuantizedKVCache(kv_bits, 32) if type(c) is KVCache else c for c in cache]
        model(mx.arange(512)[None], cache=cache)
        mx.eval([c.state for c in cache])
        plan = memory.estimate(cfg, 512, weights=weights, dtype=mx.float32, kv_bits=kv_bits, kv_group_size=32)
        linear = [c for c in cache if isinstance(c, LinearAttentionCache)]
        assert plan.kv_cache == sum(c.nbytes for c in cache if c not in linear) > 0
        assert plan.recurrent_state == sum(c.nbytes for c in linear) > 0


def test_qwen36_27b_figures():
    cfg = parse_config(
        {
            "model_type": "qwen3_5_text",
            "vocab_size": 248320,
            "hidden_size": 5120,
            "intermediate_size": 17408,
            "num_hidden_layers": 64,
            "num_attention_heads": 24,
            "num_key_value_heads": 4,
            "head_dim": 256,
            "linear_num_key_heads": 16,
            "linear_num_value_heads": 48,
            "linear_key_head_dim": 128,
            "linear_value_head_dim": 128,
            "max_position_embeddings": 262144,
        }
    )
    plan = memory.estimate(cfg, 262144, weights=int(15.5e9), dtype=mx.bfloat16, budget=128 * GiB)
    assert plan.kv_cache == 262144 * 64 * 1024  # 64 KiB per token in bf16 (16 attention layers)
    assert 150e6 < plan.recurrent_state < 160e6  # 48 layers of 48 x 128 x 128 fp32, plus conv state
    assert plan.fits
    q8 = memory.estimate(cfg, 262144, weights=int(15.5e9), dtype=mx.bfloat16, kv_bits=8, budget=128 * GiB)
    assert q8.kv_cache == plan.kv_cache * (8 + 2 * 16 / 64) / 16  # 8 bits + a bf16 scale and bias per 64
    small = memory.estimate(cfg, 32768, weights=int(15.5e9), dtype=mx.bfloat16, budget=16 * GiB)
    assert not small.fits and small.verdict.startswith("does not fit")
    assert memory.largest_context(cfg, weights=int(15.5e9), dtype=mx.bfloat16, budget=24 * GiB) % 256 == 0


def test_load_refuses_what_cannot_fit(hybrid_dir, monkeypatch):
    weights = memory.weight_bytes(load_model(hybrid_dir, lazy=True)[0])
    monkeypatch.setattr(memory, "memory_budget", lambda: weights + GiB)
    llm = mlxqwen.load(hybrid_dir)
    assert 4096 <= llm.max_context < 65536
    cfg = llm.config
    assert memory.estimate(cfg, llm.max_context, weights=weights, dtype=mx.float32).fits
    assert not memory.estimate(cfg, llm.max_context + 256, weights=weights, dtype=mx.float32).fits

    with pytest.raises(InsufficientMemoryError, match=f"max_context={llm.max_context} fits"):
        mlxqwen.load(hybrid_dir, max_context=65536)
    assert mlxqwen.load(hybrid_dir, max_context=65536, check_memory=False).max_context == 65536

    monkeypatch.setattr(memory, "memory_budget", lambda: weights // 2)
    with pytest.raises(InsufficientMemoryError, match="does not fit"):
        mlxqwen.load(hybrid_dir)


def test_fit_command(hybrid_dir, capsys):
    assert main(["fit", str(hybrid_dir), "--context", "4096"]) == 0
    assert "fits:" in capsys.readouterr().out
    assert main(["fit", str(hybrid_dir), "--context", str(2**30)]) == 1
    out = capsys.readouterr().out
    assert "does not fit" in out and "longest context that fits: 65,536" in out
    assert main(["fit", str(hybrid_dir / "missing")]) == 1
