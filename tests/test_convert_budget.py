"""Bit budgets (`--target-bpw`, `--fit`): measured sensitivity, budgets met exactly, mlx-lm's format,
calibration data, and one-line errors for bad budgets before any work."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from checkpoints import TOKENIZER_DIR
from mlx.utils import tree_flatten, tree_unflatten
from mlxqwen.convert import convert, rounding
from mlxqwen.convert import gguf as gguf_format
from mlxqwen.convert.budget import allocate, parse_size
from mlxqwen.convert.calibration import TEXT, calibration_batch, shipped_text
from mlxqwen.convert.evaluate import evaluate_models
from mlxqwen.convert.quality import source_model
from mlxqwen.convert.reader import SourceCheckpoint
from mlxqwen.convert.recipes import quantized_bytes, quants_for
from mlxqwen.convert.sensitivity import _error, measure
from test_convert import TOKENS, hf_checkpoint, logits, output_tensors, rel_err, small_tokenizer

import mlxqwen
from mlxqwen import memory
from mlxqwen.cli import main
from mlxqwen.errors import ConvertError
from mlxqwen.loader import default_dtype
from mlxqwen.tokenizer import Tokenizer

# dimensions every group size divides, so that the budget has every setting to choose from
DIMS = dict(hidden_size=128, intermediate_size=256)


@pytest.fixture
def few_draws(monkeypatch):
    """Fewer draws than a real conversion takes: enough where a test needs a plan, not its precision."""
    monkeypatch.setattr("mlxqwen.convert.sensitivity.DRAWS", 4)


@pytest.fixture(scope="module")
def calibration(tmp_path_factory) -> Path:
    """A short calibration text (about 400 tokens): enough for tiny models, and fast on a CPU."""
    file = tmp_path_factory.mktemp("calibration") / "text.txt"
    file.write_text(TEXT[:1000])
    return file


def source(path: Path, arch: str = "qwen3", **overrides) -> Path:
    _, src = hf_checkpoint(arch, path, **{**DIMS, **overrides})
    small_tokenizer(src)
    return src


def test_shipped_calibration_is_chats_in_the_models_template():
    text = shipped_text(Tokenizer.from_dir(TOKENIZER_DIR))
    assert text.count("<|im_start|>assistant") >= 16
    assert "<think>" in text and "<tool_call>" in text and "<tool_response>" in text
    assert "机器学习" in text  # not only English
    assert len(text.encode()) < 300_000


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "no such file"),
        ("", "the file is empty"),
        (b"\xff\xfe\x00bad", "not UTF-8"),
        ("dir", "is a directory"),
    ],
)
def test_calibration_file_errors(tmp_path, capsys, content, expected):
    file = tmp_path / "calibration.txt"
    if content == "dir":
        file.mkdir()
    elif isinstance(content, bytes):
        file.write_bytes(content)
    elif content is not None:
        file.write_text(content)
    # checked before the source is even looked at
    argv = ["convert", str(tmp_path / "nowhere"), "--target-bpw", "4.5", "--calibration", str(file)]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"--calibration {file}" in err and expected in err


def test_calibration_batch_is_the_files_tokens(tmp_path):
    src = source(tmp_path / "hf")
    batch = calibration_batch(src, 512, None)
    assert batch.shape[0] > 1 and batch.shape[1] == 512  # the shipped chats: several full sequences
    file = tmp_path / "mine.txt"
    file.write_text("A short text of my own about tea.")
    mine = calibration_batch(src, 512, file)
    assert mine.tolist() == [Tokenizer.from_dir(src).encode(file.read_text())]


def test_sensitivity_estimates_measured_kl(tmp_path, calibration):
    """The Fisher estimate against the KL measured by running the model with one tensor quantized."""
    src = source(tmp_path / "hf")
    checkpoint = SourceCheckpoint.open(src)
    batch = calibration_batch(src, checkpoint.cfg.vocab_size, calibration)
    names = [
        "model.embed_tokens.weight",
        "model.layers.1.self_attn.v_proj.weight",
        "model.layers.3.mlp.down_proj.weight",
    ]
    names += ["lm_head.weight"]
    settings = [(2, 64), (4, 64), (8, 64)]
    estimate, _ = measure(checkpoint, batch, {n: settings for n in names}, seed=0)
    reference = source_model(checkpoint, mx.float32)(batch)
    for name in names:
        for q in settings:
            model = source_model(checkpoint, mx.float32)
            weight = dict(tree_flatten(model.parameters()))[name]
            model.update(tree_unflatten([(name, weight + _error(weight, q))]))
            got = model(batch)
            lp, lq = (x - mx.logsumexp(x, axis=-1, keepdims=True) for x in (reference, got))
            kl = (mx.exp(lp) * (lp - lq)).sum(axis=-1).mean().item()
            assert kl / 3 < estimate[name][q] < 3 * kl, (name, q, kl, estimate[name][q])
        assert estimate[name][(2, 64)] > 4 * estimate[name][(4, 64)]


@pytest.mark.parametrize("bits", [3, 4, 6])
def test_activation_aware_rounding(bits):
    """Never a worse weighted error than round-to-nearest in any group, packed as mx.quantize packs."""
    weight = mx.random.normal((3, 32, 256), key=mx.random.key(1)).astype(mx.bfloat16)
    importance = mx.exp(2 * mx.random.normal((3, 256), key=mx.random.key(2)))  # uneven columns, per expert
    packed, scales, biases = rounding.quantize(weight, importance, 64, bits)
    nearest = mx.quantize(weight, 64, bits)
    assert [a.shape for a in (packed, scales, biases)] == [a.shape for a in nearest]
    assert packed.dtype == mx.uint32 and scales.dtype == biases.dtype == mx.bfloat16
    w = weight.astype(mx.float32)

    def error(packed, scales, biases):  # weighted squared error per group (dequantized in fp32)
        deq = mx.dequantize(packed, scales.astype(mx.float32), biases.astype(mx.float32), group_size=64, bits=bits)
        return ((deq - w) ** 2 * importance[:, None]).reshape(3, 32, 4, 64).sum(-1)

    ours, theirs = error(packed, scales, biases), error(*nearest)
    assert (ours <= theirs * (1 + 1e-3)).all() and ours.sum() < 0.9 * theirs.sum()
    # the levels unpack to the scale and bias they were fitted with
    levels = mx.round(
        (mx.dequantize(packed, scales, biases, 64, bits) - mx.repeat(biases, 64, -1)) / mx.repeat(scales, 64, -1)
    )
    assert mx.array_equal(rounding._pack(levels.astype(mx.uint32), bits), packed)


def test_allocation_fills_the_budget_greedily():
    shapes = {"a": (64, 128), "b": (64, 128)}
    settings = [(2, 64), (4, 64), (8, 64)]
    # b is ten times as sensitive as a
    kl = {"a": {(2, 64): 1.0, (4, 64): 0.1, (8, 64): 0.001}, "b": {(2, 64): 10.0, (4, 64): 1.0, (8, 64): 0.01}}
    size = {q: quantized_bytes((64, 128), q, 2) for q in settings}
    assert allocate(shapes, kl, 2 * size[(2, 64)], 2) == {"a": (2, 64), "b": (2, 64)}
    assert allocate(shapes, kl, size[(2, 64)] + size[(4, 64)], 2) == {"a": (2, 64), "b": (4, 64)}
    assert allocate(shapes, kl, size[(4, 64)] + size[(8, 64)], 2) == {"a": (4, 64), "b": (8, 64)}
    assert allocate(shapes, kl, 2 * size[(8, 64)], 2) == {"a": (8, 64), "b": (8, 64)}


@pytest.mark.parametrize(("arch", "target"), [("qwen3", 4.5), ("qwen3_5_moe_text", 6.0)])
def test_target_bpw_met_and_both_loaders_agree(tmp_path, calibration, few_draws, arch, target):
    """A tiny MoE model has a large share of tensors that stay unquantized (routers, norms), so its
    least is above 4.5 bits per weight."""
    src = source(tmp_path / "hf", arch)
    out = tmp_path / "out"
    result = convert(src, out, target_bpw=target, calibration=str(calibration))
    mlx_lm = pytest.importorskip("mlx_lm")
    from mlx_lm.utils import compute_bits_per_weight

    theirs, _ = mlx_lm.load(str(out))
    bpw = compute_bits_per_weight(theirs)
    assert target - 0.05 < result.bits_per_weight <= target
    # mlx-lm also counts a few arrays that are not weights (RoPE frequencies): under 0.001 bits per weight
    assert bpw == pytest.approx(result.bits_per_weight, abs=1e-3)
    quantization = json.loads((out / "config.json").read_text())["quantization"]
    overrides = {k: v for k, v in quantization.items() if isinstance(v, dict)}
    assert overrides and len({(v["bits"], v["group_size"]) for v in overrides.values()}) > 1  # mixed, per tensor
    written = output_tensors(out)
    assert not any(k.endswith(("mlp.gate.scales", "shared_expert_gate.scales", "in_proj_a.scales")) for k in written)
    ours = mlxqwen.load(out, dtype=mx.float32)
    assert rel_err(logits(ours.model), logits(theirs)) < 1e-5


def test_same_seed_same_output(tmp_path, calibration, few_draws):
    src = source(tmp_path / "hf", "qwen3_5_text")
    convert(src, tmp_path / "a", target_bpw=4.0, calibration=str(calibration), seed=3)
    convert(src, tmp_path / "b", target_bpw=4.0, calibration=str(calibration), seed=3)
    a, b = output_tensors(tmp_path / "a"), output_tensors(tmp_path / "b")
    assert a.keys() == b.keys() and all(mx.array_equal(a[k], b[k]) for k in a)
    assert (tmp_path / "a" / "config.json").read_text() == (tmp_path / "b" / "config.json").read_text()


def test_fit_fills_the_memory(tmp_path, calibration, few_draws):
    src = source(tmp_path / "hf")
    cfg = SourceCheckpoint.open(src).cfg
    context = 4096
    dtype = default_dtype()
    rest = memory.mlx_estimate(cfg, context, weights=0, dtype=dtype, budget=0).total
    fit = rest + 300 * 1024  # 300 KiB for the weights: between 2 and 8 bits for this model
    convert(src, tmp_path / "out", fit=f"{fit / 1024:.0f}KB", context=context, calibration=str(calibration))
    model = mlxqwen.load(tmp_path / "out").model
    need = memory.mlx_estimate(cfg, context, weights=memory.weight_bytes(model), dtype=dtype, budget=fit)
    assert need.fits and need.total > fit - 16 * 1024  # within one setting's step of the budget
    assert np.isfinite(logits(model, TOKENS)).all()


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (["--target-bpw", "1.5"], "--target-bpw 1.5: below 2 bits per weight is not supported"),
        (["--target-bpw", "2.1"], "--target-bpw 2.1: too small for this model, which needs at least"),
        (["--fit", "1MB"], "--fit 1MB at --context 32768: too small for this model, which needs at least"),
        (["--fit", "lots"], "--fit lots: expected a memory size like 16GB"),
        (["--fit", "16GB", "--context", "0"], "--context 0: must be a positive number of tokens"),
        (["--target-bpw", "4", "--fit", "16GB"], "not both"),
        (["--target-bpw", "4", "--recipe", "8bit"], "--recipe 8bit: a budget chooses bits and group sizes"),
        (["--recipe", "8bit", "--calibration", "x.txt"], "--calibration x.txt: calibrates a budget"),
    ],
)
def test_bad_budgets_fail_before_any_work(tmp_path, capsys, monkeypatch, options, expected):
    src = source(tmp_path / "hf")

    def no_work(*_, **__):
        raise AssertionError("measured sensitivity for a budget that cannot work")

    monkeypatch.setattr("mlxqwen.convert.budget.measure", no_work)
    capsys.readouterr()
    assert main(["convert", str(src), "-o", str(tmp_path / "out"), *options]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and expected in err
    assert not (tmp_path / "out").exists()


def test_parse_size():
    assert parse_size("16GB") == 16 * 2**30 == parse_size("16 GiB") == parse_size("16g")
    assert parse_size("1.5TB") == int(1.5 * 2**40)
    with pytest.raises(ConvertError):
        parse_size("16 gigs")
    assert quants_for("model.layers.0.mlp.gate.weight", (4, 128)) == []  # routers stay precise


def test_card_has_the_sensitivity_table(tmp_path, calibration, few_draws):
    src = source(tmp_path / "hf")
    convert(src, tmp_path / "out", target_bpw=4.5, calibration=str(calibration))
    card = (tmp_path / "out" / "README.md").read_text()
    assert "## Sensitivity (30 most sensitive of 30 tensors)" in card
    assert "| `lm_head` |" in card and "| `model.layers.0.mlp.down_proj` |" in card


def test_eval_any_two_models(tmp_path, capsys):
    """`mlxqwen eval` gives the conversion's own report for an MLX output, and runs GGUF files too."""
    src = source(tmp_path / "hf")
    report = convert(src, tmp_path / "q4", recipe="4bit", eval=True).quality
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "q4"), "--against", str(src)]) == 0
    out = capsys.readouterr().out
    assert f"KL {report.kl:.4f} nats/token, top-1 agreement {report.top1:.1%}" in out


def test_eval_gguf(tmp_path):
    pytest.importorskip("llama_cpp")
    _, src = hf_checkpoint("qwen3", tmp_path / "hf", vocab_size=151936)  # llama.cpp needs Qwen's tokenizer
    text = tmp_path / "text.txt"
    text.write_text(TEXT[:300])
    convert(src, tmp_path / "f32.gguf", to="gguf", quant="F32")
    convert(src, tmp_path / "q8.gguf", to="gguf", quant="Q8_0")
    exact = evaluate_models(tmp_path / "f32.gguf", src, text)
    assert exact.kl < 1e-6 and exact.top1 == 1.0  # llama.cpp and mlxqwen agree on the unquantized model
    q8 = evaluate_models(tmp_path / "q8.gguf", tmp_path / "f32.gguf", text)  # both sides GGUF
    assert 0 < q8.kl < 0.01 and q8.tokens == exact.tokens


@pytest.mark.parametrize(("quant", "max_kl", "min_top1"), [("Q8_0", 1e-4, 0.9), ("Q4_K_M", 5e-3, 0.6)])
def test_eval_quantized_gguf_of_a_small_model(tmp_path, quant, max_kl, min_top1):
    """`mlxqwen eval` runs a quantized GGUF of a small model (hidden 128, heads of 64, a 480-token
    vocabulary) and finds it close to the F32 GGUF, in a process of its own: ggml's AMX matmul,
    which crashes (on CPUs that have AMX), is not used there either (conftest keeps it out of this one)."""
    pytest.importorskip("llama_cpp")
    src = source(tmp_path / "hf", num_attention_heads=2, num_key_value_heads=1, head_dim=64)
    small_tokenizer(src, qwen_pre_tokenizer=True)
    text = tmp_path / "text.txt"
    text.write_text(TEXT[:1000])
    convert(src, tmp_path / "f32.gguf", to="gguf", quant="F32")
    convert(src, tmp_path / "q.gguf", to="gguf", quant=quant)
    argv = ["eval", str(tmp_path / "q.gguf"), "--against", str(tmp_path / "f32.gguf"), "--text", str(text)]
    run = subprocess.run([sys.executable, "-m", "mlxqwen.cli", *argv], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"exit status {run.returncode}: {run.stderr[-2000:]}"
    found = re.search(r"KL ([\d.]+) nats/token, top-1 agreement ([\d.]+)%", run.stdout)
    assert found, run.stdout
    assert float(found[1]) <= max_kl and min_top1 < float(found[2]) / 100 < 1  # quantized, and close


def test_gguf_importance_matrix(tmp_path, monkeypatch):
    """llama.cpp's quantizer gets our importance matrix, by its tensor names, and its K-quants change."""
    pytest.importorskip("llama_cpp")
    # K-quants need rows of 256; llama.cpp needs Qwen's tokenizer
    _, src = hf_checkpoint("qwen3", tmp_path / "hf", vocab_size=151936, hidden_size=256, intermediate_size=512)
    text = tmp_path / "text.txt"
    text.write_text(TEXT[:1500])
    convert(src, tmp_path / "plain.gguf", to="gguf", quant="Q4_K_M")
    given = {}
    quantize = gguf_format._llama_quantize

    def spy(src, out, file_type, progress, imatrix):
        given.update(imatrix)
        quantize(src, out, file_type, progress, imatrix)

    monkeypatch.setattr(gguf_format, "_llama_quantize", spy)
    convert(src, tmp_path / "imatrix.gguf", to="gguf", quant="Q4_K_M", imatrix=True, calibration=str(text))
    assert len(given) == 4 * 7 + 1 and given["output.weight"].shape == (256,)  # 4 layers x 7, and the output
    assert given["blk.0.ffn_down.weight"].shape == (512,) and (given["blk.0.attn_q.weight"] > 0).all()
    a, b = ((tmp_path / f).read_bytes() for f in ("plain.gguf", "imatrix.gguf"))
    assert len(a) == len(b) and a != b  # same types, other roundings
    q = evaluate_models(tmp_path / "imatrix.gguf", src, text)
    assert 0 < q.kl < 0.05


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (["--quant", "Q8_0", "--imatrix"], "--imatrix: only llama.cpp's K-quants use an importance matrix"),
        (["--quant", "Q4_K_M", "--calibration", "x.txt"], "--calibration x.txt: calibrates an importance matrix"),
    ],
)
def test_bad_imatrix_options(tmp_path, capsys, options, expected):
    assert main(["convert", str(tmp_path), "--to", "gguf", *options]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and expected in err
