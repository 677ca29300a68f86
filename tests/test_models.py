"""MLX logits against transformers for every architecture and config form."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch
from checkpoints import build_reference, reference_logits, save_checkpoint

import mlxqwen

TOL = 1e-4
TOKENS = [int(t) for t in np.random.RandomState(1).randint(0, 512, 24)]

CASES = {
    "qwen2": ("qwen2", {}),
    "qwen2-mha-tied": ("qwen2", {"num_key_value_heads": 4, "tie_word_embeddings": True}),
    "qwen3": ("qwen3", {}),
    "qwen3-1kv": ("qwen3", {"num_key_value_heads": 1}),
    "qwen3-yarn": (
        "qwen3",
        {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}},
    ),
    "qwen3-linear-rope": ("qwen3", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    "qwen3_moe": ("qwen3_moe", {}),
    "qwen3_moe-sparse-step": ("qwen3_moe", {"decoder_sparse_step": 2, "mlp_only_layers": [3], "norm_topk_prob": False}),
    "qwen3_5": ("qwen3_5_text", {}),
    "qwen3_5-tied-1kv": ("qwen3_5_text", {"tie_word_embeddings": True, "num_key_value_heads": 1}),
    "qwen3_5-equal-heads": ("qwen3_5_text", {"linear_num_value_heads": 2}),
    "qwen3_5_moe": ("qwen3_5_moe_text", {}),
}


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module", params=[(case, style) for case in CASES for style in ("t5", "t4")], ids=str)
def pair(request, tmp_path_factory):
    case, style = request.param
    arch, overrides = CASES[case]
    if style == "t4" and "yarn" not in case and case not in ("qwen3", "qwen3_moe", "qwen3_5", "qwen3_5_moe"):
        pytest.skip("config style matters for the base cases and YaRN only")
    ref = build_reference(arch, **overrides)
    path = save_checkpoint(ref, tmp_path_factory.mktemp(case), style=style)
    return ref, mlxqwen.load(path, dtype=mx.float32)


def test_full_pass(pair):
    ref, llm = pair
    expected = reference_logits(ref, TOKENS).numpy()
    got = np.array(llm.model(mx.array([TOKENS]))[0])
    assert rel_err(got, expected) < TOL


def test_token_by_token_decode(pair):
    ref, llm = pair
    expected = reference_logits(ref, TOKENS).numpy()
    cache = llm.model.make_cache()
    got = np.concatenate([np.array(llm.model(mx.array([[t]]), cache=cache)[0]) for t in TOKENS])
    assert rel_err(got, expected) < TOL


def test_chunked_prefill_then_decode(pair):
    ref, llm = pair
    expected = reference_logits(ref, TOKENS).numpy()
    cache = llm.model.make_cache()
    parts = [TOKENS[:7], TOKENS[7:16], *[[t] for t in TOKENS[16:]]]
    got = np.concatenate([np.array(llm.model(mx.array([p]), cache=cache)[0]) for p in parts])
    assert rel_err(got, expected) < TOL


def test_greedy_tokens_match_transformers(pair):
    ref, llm = pair
    prompt = TOKENS[:8]
    with torch.no_grad():
        out = ref.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False, min_new_tokens=32)
    expected = out[0, len(prompt) :].tolist()
    cache = llm.model.make_cache()
    logits = llm.model(mx.array([prompt]), cache=cache)
    got = []
    for _ in range(32):
        token = int(mx.argmax(logits[0, -1]).item())
        got.append(token)
        logits = llm.model(mx.array([[token]]), cache=cache)
    assert got == expected


def test_snapshot_restore_continues_exactly(pair):
    _, llm = pair
    cache = llm.model.make_cache()
    llm.model(mx.array([TOKENS[:10]]), cache=cache)
    marks = [c.snapshot() for c in cache]
    first = np.array(llm.model(mx.array([TOKENS[10:14]]), cache=cache))
    llm.model(mx.array([TOKENS[14:20]]), cache=cache)
    for c, m in zip(cache, marks, strict=True):
        c.restore(m)
    again = np.array(llm.model(mx.array([TOKENS[10:14]]), cache=cache))
    np.testing.assert_array_equal(first, again)


LONG = [int(t) for t in np.random.RandomState(4).randint(0, 512, 150)]


def test_long_prompt_in_chunks(pair):
    """Prefills of 64+ tokens take the chunked Gated DeltaNet path, continuing a cached state."""
    ref, llm = pair
    expected = reference_logits(ref, LONG).numpy()
    cache = llm.model.make_cache()
    got = np.concatenate([np.array(llm.model(mx.array([p]), cache=cache)[0]) for p in (LONG[:70], LONG[70:])])
    assert rel_err(got, expected) < TOL
