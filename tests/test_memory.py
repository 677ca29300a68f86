"""The memory policy: estimates against what MLX and llama.cpp really take (MLX's allocator and
the process's resident memory, each architecture at several contexts; llama.cpp's own
allocations for real Qwen shapes), the published Qwen3.6-27B figures, loads that refuse what
cannot fit on both runtimes and say what would, and `mlxqwen fit`."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from checkpoints import TOKENIZER_DIR, build_reference, save_checkpoint

import mlxqwen
from mlxqwen import InsufficientMemoryError, ModelLoadError, demo, memory
from mlxqwen.backends import sizing
from mlxqwen.cache import KVCache, LinearAttentionCache, QuantizedKVCache
from mlxqwen.cli import main
from mlxqwen.config import parse_config
from mlxqwen.loader import load_model

GiB, MiB = 1024**3, 1024**2
HERE = Path(__file__).parent
QWEN36_27B = {
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
        if kv_bits:  # a head size of 32: groups of 32
            cache = [QuantizedKVCache(kv_bits, 32) if type(c) is KVCache else c for c in cache]
        model(mx.arange(512)[None], cache=cache)
        mx.eval([c.state for c in cache])
        plan = memory.mlx_estimate(cfg, 512, weights=weights, dtype=mx.float32, kv_bits=kv_bits)
        linear = [c for c in cache if isinstance(c, LinearAttentionCache)]
        assert plan.kv_cache == sum(c.nbytes for c in cache if c not in linear) > 0
        assert plan.recurrent_state == sum(c.nbytes for c in linear) > 0
    one = memory.mlx_estimate(cfg, 512, weights=weights, dtype=mx.float32)
    three = memory.mlx_estimate(cfg, 512, weights=weights, dtype=mx.float32, sequences=3)
    assert (three.kv_cache, three.recurrent_state) == (3 * one.kv_cache, 3 * one.recurrent_state)
    assert three.working > one.working


def test_qwen36_27b_figures():
    cfg = parse_config(QWEN36_27B)
    plan = memory.mlx_estimate(cfg, 262144, weights=int(15.5e9), dtype=mx.bfloat16, budget=128 * GiB)
    assert plan.kv_cache == 262144 * 64 * 1024  # 64 KiB per token in bf16 (16 attention layers)
    assert 150e6 < plan.recurrent_state < 160e6  # 48 layers of 48 x 128 x 128 fp32, plus conv state
    assert plan.fits
    q8 = memory.mlx_estimate(cfg, 262144, weights=int(15.5e9), dtype=mx.bfloat16, kv_bits=8, budget=128 * GiB)
    assert q8.kv_cache == plan.kv_cache * (8 + 2 * 16 / 64) / 16  # 8 bits + a bf16 scale and bias per 64
    small = memory.mlx_estimate(cfg, 32768, weights=int(15.5e9), dtype=mx.bfloat16, budget=16 * GiB)
    assert not small.fits and small.verdict.startswith("does not fit")


# --- estimates against measured peaks: every architecture, several contexts, both runtimes ---

# Wider heads than the other tests' models, so that the K/V cache and attention count; tied
# embeddings, so that the (real) vocabulary's weights do not drown them.
_MEASURED = dict(
    max_position_embeddings=32768,
    hidden_size=128,
    intermediate_size=256,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=64,
    tie_word_embeddings=True,
)
# two full-attention layers, neither the last (whose attention a prefill never needs)
_HYBRID = dict(
    num_hidden_layers=8, linear_value_head_dim=16, layer_types=(["linear_attention"] * 3 + ["full_attention"]) * 2
)
ARCHS = {"qwen2": {}, "qwen3": {}, "qwen3_moe": {}, "qwen3_5_text": _HYBRID, "qwen3_5_moe_text": _HYBRID}


@pytest.fixture(scope="module")
def measured_models(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """arch -> (Hugging Face checkpoint, its Q8_0 GGUF), with the real tokenizer's vocabulary; and
    the demo model's two forms."""
    pytest.importorskip("gguf")
    from checkpoints import to_gguf

    out = {"demo": (demo.model_path("mlx"), demo.model_path("gguf"))}  # 4-bit MLX, Q4_K_M
    for arch, overrides in ARCHS.items():
        tmp = tmp_path_factory.mktemp(arch)
        src = save_checkpoint(build_reference(arch, vocab_size=151936, **_MEASURED, **overrides), tmp / "hf")
        out[arch] = src, to_gguf(src, tmp / "model-Q8_0.gguf", "Q8_0")
    return out


def _fill(runtime, seq, start: int, end: int) -> None:
    """Prefill positions start..end-2 as the engine does, then one decode step: `end` tokens held."""
    tokens = [int(t) for t in np.random.RandomState(start).randint(0, 1000, end - start)]
    for i in range(0, len(tokens) - 1, runtime.prefill_chunk):
        runtime.prefill(seq, tokens[i : min(i + runtime.prefill_chunk, len(tokens) - 1)])
    mx.eval(runtime.decode([seq], mx.array(tokens[-1:])))


@pytest.mark.parametrize("arch", [*ARCHS, "demo"])
def test_mlx_estimate_holds_the_measured_peak(measured_models, arch):
    """MLX's own peak (weights, cache, transients) from before the load to a full context is at
    most the estimate, and the estimate at most 25 % above it. MLX allocates as the context
    fills, so one load measures each context in turn."""
    path = measured_models[arch][0]
    plan = sizing(path, "mlx")[1]
    mx.clear_cache()
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    runtime = mlxqwen.load(path, backend="mlx", max_context=2048).runtime
    seq, held = runtime.new_sequence(), 0
    for context in (1024, 2048):
        _fill(runtime, seq, held, context)
        held = context
        peak = mx.get_peak_memory() - before
        estimate = plan.estimate(context)
        needed = estimate.total - estimate.runtime  # the process and the tokenizer are not MLX's
        assert peak <= needed <= 1.25 * peak, (context, peak / MiB, needed / MiB)


@pytest.mark.parametrize("arch", [*ARCHS, "demo"])
def test_llama_estimate_holds_the_measured_peak(measured_models, arch):
    """The process's peak resident memory grows, from before the load to a full context, by at
    most the estimate (less its allowance for the interpreter and libraries), and the estimate
    is at most 25 % above it: llama.cpp's buffers, the mapped weights, the tokenizers' tables
    and llama.cpp's graphs all count. Each context in a fresh process."""
    pytest.importorskip("llama_cpp")
    gguf = measured_models[arch][1]
    plan = sizing(gguf, "llama.cpp")[1]
    for context in (2048, 8192) if arch != "demo" else (1024, 4096):
        run = subprocess.run(
            [sys.executable, str(HERE / "peak_rss.py"), str(gguf), "llama.cpp", str(context)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert run.returncode == 0, run.stderr[-2000:]
        growth = int(run.stdout.split()[-1])
        needed = plan.estimate(context).total - memory.PROCESS
        assert growth <= needed <= 1.25 * growth, (context, growth / MiB, needed / MiB)


# --- llama.cpp's own allocations for real Qwen shapes ------------------------------------

REAL_SHAPES = {
    "Qwen2.5-7B": dict(
        model_type="qwen2",
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        max_position_embeddings=32768,
    ),
    "Qwen3-8B": dict(
        model_type="qwen3",
        vocab_size=151936,
        hidden_size=4096,
        intermediate_size=12288,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=40960,
    ),
    "Qwen3-30B-A3B": dict(
        model_type="qwen3_moe",
        vocab_size=151936,
        hidden_size=2048,
        intermediate_size=6144,
        moe_intermediate_size=768,
        num_experts=128,
        num_experts_per_tok=8,
        num_hidden_layers=48,
        num_attention_heads=32,
        num_key_value_heads=4,
        head_dim=128,
        max_position_embeddings=40960,
        norm_topk_prob=True,
    ),
    "Qwen3.6-27B": dict(QWEN36_27B, rope_parameters=dict(rope_theta=1e7, mrope_section=[11, 11, 10])),
    "Qwen3.6-35B-A3B": dict(
        QWEN36_27B,
        model_type="qwen3_5_moe_text",
        hidden_size=2048,
        intermediate_size=0,
        moe_intermediate_size=512,
        shared_expert_intermediate_size=512,
        num_experts=256,
        num_experts_per_tok=8,
        num_hidden_layers=40,
        num_attention_heads=16,
        num_key_value_heads=2,
        linear_num_value_heads=32,
        rope_parameters=dict(rope_theta=1e7, mrope_section=[11, 11, 10]),
    ),
}


def sparse_gguf(config: dict, path: Path) -> Path:
    """A GGUF of this shape as `mlxqwen convert --to gguf --quant Q8_0` writes it (metadata,
    tokenizer, tensor infos), with its data left as a hole in a sparse file: llama.cpp can plan
    its memory without a weight being there."""
    import gguf
    from mlx.utils import tree_flatten
    from mlxqwen.convert import gguf as writer
    from mlxqwen.convert import gguf_mapping as mapping

    from mlxqwen.models import build_model

    cfg = parse_config(config)
    arch = mapping.llama_arch(cfg, str(path))
    w = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[arch])
    mapping.write_metadata(w, cfg, arch, path.stem, str(path))
    mapping.write_tokenizer(w, TOKENIZER_DIR, cfg.vocab_size)
    names, data = gguf.get_tensor_name_map(arch, cfg.num_hidden_layers), 0
    for key, value in tree_flatten(build_model(cfg).parameters()):  # lazy: nothing is computed
        key, value = mapping.to_llama(key, value, cfg)
        tensor = names.get_name(key, try_suffixes=(".weight", ".bias"))
        qtype = mapping.tensor_type(tensor, value.shape, gguf.GGMLQuantizationType.Q8_0)
        nbytes = writer._nbytes(value.shape, qtype)
        w.add_tensor_info(tensor, value.shape, np.dtype(np.float32), nbytes, raw_dtype=qtype)
        data += nbytes + -nbytes % w.data_alignment
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    with open(path, "r+b") as f:
        f.truncate(-(-f.seek(0, 2) // w.data_alignment) * w.data_alignment + data)
    return path


class _Allocations(logging.Handler):
    """llama.cpp's log lines that give its buffers' sizes, in MiB."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def sizes(self) -> dict[str, float]:
        found = {"KV": 0.0, "RS": 0.0, "output": 0.0, "compute": 0.0}
        for pattern, key in [
            (r"llama_kv_cache: size =\s+([\d.]+) MiB", "KV"),
            (r"llama_memory_recurrent: size =\s+([\d.]+) MiB", "RS"),
            (r"CPU\s+output buffer size =\s+([\d.]+) MiB", "output"),
            (r"CPU compute buffer size =\s+([\d.]+) MiB", "compute"),
        ]:
            found[key] = sum(float(m[1]) for line in self.lines if (m := re.search(pattern, line)))
        return found


@pytest.mark.parametrize("shape", REAL_SHAPES)
def test_llama_estimate_covers_llama_cpps_allocations(shape, tmp_path):
    """For real Qwen shapes, llama.cpp plans its buffers (no_alloc: nothing is allocated, no
    weight read) at long contexts, with several sequences (and recurrent states kept to roll
    back to), each K/V type: the estimate has its
    K/V cache and recurrent state exactly, never less than its compute and output buffers, and,
    as `load` runs it, at most 25 % more of them."""
    llama_cpp = pytest.importorskip("llama_cpp")
    pytest.importorskip("gguf")
    from mlxqwen.backends import llama_cpp as backend

    path = sparse_gguf(REAL_SHAPES[shape], tmp_path / f"{shape}.gguf")
    model = memory.GGUFModel.read(path)
    params = backend.model_params()
    params.no_alloc, params.load_mode = True, llama_cpp.LLAMA_LOAD_MODE_NONE
    handle = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
    assert handle
    assert model.weights == pytest.approx(llama_cpp.llama_model_size(handle), rel=1e-3)
    log = logging.getLogger("mlxqwen.llama_cpp")
    allocations, level = _Allocations(), log.level
    log.addHandler(allocations)
    log.setLevel(logging.DEBUG)
    try:
        cases = [("f16", 4096, 1, 0), ("f16", 131072, 1, 0), ("f16", 32768, 4, 0), ("f16", 32768, 4, 3),
                 ("q8_0", 32768, 1, 0), ("f32", 16384, 1, 0)]  # fmt: skip
        for kv_type, n_ctx, n_seq, n_rs in cases:
            ctx_params = llama_cpp.llama_context_default_params()
            ctx_params.n_ctx, ctx_params.n_seq_max, ctx_params.n_rs_seq = n_ctx, n_seq, n_rs
            ctx_params.n_batch = ctx_params.n_ubatch = backend.PREFILL_CHUNK
            ctx_params.n_outputs_max = n_seq
            ctx_params.type_k = ctx_params.type_v = backend._GGML_TYPES[kv_type]
            ctx_params.flash_attn_type = (
                llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED if kv_type == "f32" else llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO
            )
            allocations.lines.clear()
            ctx = llama_cpp.llama_init_from_model(handle, ctx_params)
            assert ctx
            llama_cpp.llama_free(ctx)
            got = allocations.sizes()
            plan = memory.llama_estimate(model, n_ctx, kv_type=kv_type, n_seq_max=n_seq, n_outputs=n_seq, n_rs_seq=n_rs)
            case = (kv_type, n_ctx, n_seq, n_rs, got)
            assert plan.kv_cache / MiB == pytest.approx(got["KV"], abs=0.01), case
            assert plan.recurrent_state / MiB == pytest.approx(got["RS"], abs=0.01), case
            buffers = plan.working - memory._llama_graphs(model, backend.PREFILL_CHUNK)
            assert got["compute"] + got["output"] <= buffers / MiB, case
            if kv_type != "f32" and n_seq == 1:
                assert buffers / MiB <= 1.25 * (got["compute"] + got["output"]), case
    finally:
        log.removeHandler(allocations)
        log.setLevel(level)
        llama_cpp.llama_model_free(handle)


# --- loads that do not fit are refused, with what would ------------------------------------


def test_load_refuses_what_cannot_fit(hybrid_dir, monkeypatch):
    weights = memory.weight_bytes(load_model(hybrid_dir, lazy=True)[0])
    monkeypatch.setattr(memory, "memory_budget", lambda: weights + GiB)
    llm = mlxqwen.load(hybrid_dir)
    assert 4096 <= llm.max_context < 65536
    plan = sizing(hybrid_dir, "mlx")[1]
    assert plan.estimate(llm.max_context).fits and not plan.estimate(llm.max_context + 256).fits

    with pytest.raises(InsufficientMemoryError, match=f"max_context=65536 the model does not fit.*; "
                       f"max_context={llm.max_context} fits$"):  # fmt: skip
        mlxqwen.load(hybrid_dir, max_context=65536)
    assert mlxqwen.load(hybrid_dir, max_context=65536, check_memory=False).max_context == 65536

    monkeypatch.setattr(memory, "memory_budget", lambda: weights // 2)
    with pytest.raises(InsufficientMemoryError, match="at 4096 tokens of context the model does not fit"):
        mlxqwen.load(hybrid_dir)


def test_a_context_past_the_model_and_memory_is_refused_with_what_fits(monkeypatch):
    """The issue's example: max_context=10**7 on the demo model, in both forms."""
    for path, backend in [(demo.model_path("gguf"), "llama.cpp"), (demo.model_path("mlx"), "mlx")]:
        if backend == "llama.cpp":
            pytest.importorskip("llama_cpp")
        with pytest.raises(ModelLoadError, match=r"max_context=10000000 is past the 4,096 tokens this model handles; "
                           r'max_context=4096 fits, or extend it with YaRN: rope_scaling=\{"rope_type": "yarn", '
                           r'"factor": 2441.5\}$'):  # fmt: skip
            mlxqwen.load(path, backend=backend, max_context=10**7)
        yarn = {"rope_type": "yarn", "factor": 2441.5}
        plan = sizing(path, backend, rope_scaling=yarn)[1]
        assert plan.limit >= 10**7
        monkeypatch.setattr(memory, "memory_budget", lambda: 4 * GiB)  # what 10**7 tokens do not fit in
        fits = memory.largest_context(plan)
        assert 0 < fits < 10**7 and plan.estimate(fits).fits and not plan.estimate(fits + 256).fits
        with pytest.raises(InsufficientMemoryError, match=rf"max_context=10000000 the model does not fit: needs "
                           rf"[\d.]+ GiB, this machine allows 4.0 GiB; max_context={fits} fits$"):  # fmt: skip
            mlxqwen.load(path, backend=backend, max_context=10**7, rope_scaling=yarn)
        monkeypatch.undo()


# --- mlxqwen fit -----------------------------------------------------------------------------


def test_fit_command(hybrid_dir, capsys):
    assert main(["fit", str(hybrid_dir), "--context", "4096"]) == 0
    out = capsys.readouterr().out
    assert "on MLX with 4,096 tokens" in out and "fits:" in out
    assert main(["fit", str(hybrid_dir), "--context", "65536", "--kv-bits", "4"]) == 0
    assert main(["fit", str(hybrid_dir), "--context", str(2**30)]) == 1
    out = capsys.readouterr().out
    assert "past the 65,536 tokens this model handles" in out and '"factor": 16384.0' in out
    assert main(["fit", str(hybrid_dir / "missing")]) == 1
    assert capsys.readouterr().err == (
        f"mlxqwen fit: error: {hybrid_dir / 'missing'}: no such model directory or GGUF file, nor a local model name; "
        "see mlxqwen list\n"
    )


def test_fit_without_weights_and_on_gguf(hybrid_dir, tmp_path, capsys, monkeypatch):
    """A directory with only config.json (before a download) and a GGUF file are estimated from
    their headers, as `load` would run them."""
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    (config_only / "config.json").write_text((hybrid_dir / "config.json").read_text())
    guess, exact = (sizing(path, "mlx")[1].estimate(4096) for path in (config_only, hybrid_dir))
    assert guess.weights == pytest.approx(exact.weights, rel=1e-3)  # A_log: fp32 unless a checkpoint says
    assert replace(guess, weights=0) == replace(exact, weights=0)
    monkeypatch.setattr(memory, "memory_budget", lambda: 16 * GiB)
    assert main(["fit", str(config_only), "--context", "8192"]) == 0
    assert "on MLX with 8,192 tokens" in capsys.readouterr().out

    quantized = tmp_path / "quantized"  # an MLX repo's config: the size as quantized
    quantized.mkdir()
    (quantized / "config.json").write_text((demo.model_path("mlx") / "config.json").read_text())
    weights = memory.weight_bytes(load_model(demo.model_path("mlx"), lazy=True)[0])
    assert sizing(quantized, "mlx")[1].estimate(4096).weights == weights

    pytest.importorskip("llama_cpp")
    gguf = str(demo.model_path("gguf"))
    assert main(["fit", gguf, "--context", "4096"]) == 0
    out = capsys.readouterr().out
    assert "on llama.cpp with 4,096 tokens" in out and "fits:" in out
    assert main(["fit", gguf, "--context", "8192"]) == 1
    assert "past the 4,096 tokens" in capsys.readouterr().out
    assert main(["fit", gguf, "--context", "8192", "--rope-scaling", '{"rope_type": "yarn", "factor": 2}']) == 0


def test_fit_agrees_with_load_on_kv_bits(tmp_path, monkeypatch):
    """K/V quantization groups by the largest of 64 and 32 that divides the head size (32 here),
    and `fit` counts the cache `load` makes."""
    path = save_checkpoint(build_reference("qwen3", head_dim=32), tmp_path / "hf")
    llm = mlxqwen.load(path, kv_bits=8, max_context=1024)
    assert llm.runtime.kv_group_size == 32
    seq = llm.runtime.new_sequence()
    llm.runtime.prefill(seq, list(range(1024)))
    plan = sizing(path, "mlx", kv_bits=8)[1].estimate(1024)
    assert plan.kv_cache == sum(c.nbytes for c in seq.caches)
    reference = mlxqwen.load(path, max_context=1024)
    tokens = mx.array(list(range(20)))
    quantized, plain = llm.new_cache(), reference.new_cache()
    a, b = (np.array(m.model(tokens[None], cache=c)[0, -1]) for m, c in ((llm, quantized), (reference, plain)))
    assert np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b) > 0.99
    with pytest.raises(ValueError, match="head size 16 is not a multiple of 32"):
        mlxqwen.load(save_checkpoint(build_reference("qwen3"), tmp_path / "h16"), kv_bits=8)


@pytest.mark.parametrize("cache", [KVCache, QuantizedKVCache], ids=["kv", "quantized"])
def test_a_snapshot_holds_only_what_it_counts(cache):
    """A snapshot of 10 positions keeps those rows, not the 256-row buffer they were written into:
    the prefix cache's budget counts snapshot bytes, so anything more would be memory it never sees."""
    kv = cache()
    kv.update_and_fetch(mx.ones((1, 4, 10, 64)), mx.ones((1, 4, 10, 64)))
    mx.eval(kv.state)
    mx.clear_cache()
    before = mx.get_active_memory() - sum(a.nbytes for a in kv.state)
    snapshot = kv.snapshot()
    held = [a for part in snapshot[:2] for a in (part if isinstance(part, tuple) else (part,))]
    mx.eval(held)
    del kv
    mx.clear_cache()
    assert mx.get_active_memory() - before == sum(a.nbytes for a in held) < 40_000


def test_idle_engine_gives_freed_buffers_back(hybrid_dir):
    """Between requests MLX's cache of freed buffers is emptied: a long-running server's resident
    memory is what it holds, not the most it ever used."""
    llm = mlxqwen.load(hybrid_dir, backend="mlx")
    llm.generate("Hello there", max_tokens=8, temperature=0)
    deadline = time.monotonic() + 10
    while mx.get_cache_memory() and time.monotonic() < deadline:  # the engine settles right after
        time.sleep(0.05)
    assert mx.get_cache_memory() == 0
