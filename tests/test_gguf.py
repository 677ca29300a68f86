"""GGUF export: llama.cpp runs converted tiny models as transformers does, its tokenizer
matches tokenizer.json, quantized files load and generate, and bad input fails cleanly."""

from __future__ import annotations

import io
import json
import re
import shutil
from pathlib import Path

import gguf
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from checkpoints import TOKENIZER_DIR, build_reference, reference_logits, save_checkpoint, to_fp8, to_gguf
from mlx.utils import tree_flatten
from mlxqwen.convert import ConvertError
from mlxqwen.convert.api import format_options
from mlxqwen.convert.gguf import GGUF
from mlxqwen.convert.progress import make_progress
from mlxqwen.convert.source import Source
from rich.console import Console
from tokenizers import Tokenizer

import mlxqwen
from mlxqwen.cli import main
from mlxqwen.loader import load_model

llama_cpp = pytest.importorskip("llama_cpp")

VOCAB = 151936  # the real tokenizer's vocabulary as Qwen models see it
TOKENS = [int(t) for t in np.random.RandomState(1).randint(0, 151_600, 24)]
# llama.cpp's Qwen3.5 needs K and V heads of one size; 2 K heads for 4 V heads exercises the V-head reordering.
_LINEAR = {"linear_value_head_dim": 16}

CASES = {
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {}),
    "qwen3-yarn-tied": (
        "qwen3",
        {
            "tie_word_embeddings": True,
            "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
        },
    ),
    "qwen3_moe": ("qwen3_moe", {}),
    # a layer pattern other than llama.cpp's default (every 4th layer full attention)
    "qwen3_5-tied": (
        "qwen3_5_text",
        {
            **_LINEAR,
            "tie_word_embeddings": True,
            "layer_types": ["linear_attention", "full_attention", "linear_attention", "full_attention"],
        },
    ),
    "qwen3_5_moe": ("qwen3_5_moe_text", _LINEAR),
}

# In F32 with an F32 KV cache, llama.cpp and transformers differ only by float32 rounding in
# a different summation order: measured <= 6e-7 relative to the largest logit on every case.
F32_TOL = 1e-5


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(((a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)).min())


def open_gguf(path: Path, f32_cache: bool = False, **kwargs):
    cache = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32} if f32_cache else {}
    # one thread: llama.cpp's spinning workers crawl when the test machine's cores are busy
    return llama_cpp.Llama(str(path), n_ctx=128, n_threads=1, logits_all=True, verbose=False, **cache, **kwargs)


def llama_logits(path: Path, tokens: list[int], f32_cache: bool = False) -> np.ndarray:
    llm = open_gguf(path, f32_cache)
    llm.eval(tokens)
    logits = np.array(llm.scores[: len(tokens)])
    llm.close()
    return logits


def greedy_llama(path: Path, prompt: list[int], n: int) -> list[int]:
    llm = open_gguf(path, f32_cache=True)
    llm.eval(prompt)
    out = []
    for _ in range(n):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval(out[-1:])
    llm.close()
    return out


def greedy_mlx(path: Path, prompt: list[int], n: int) -> list[int]:
    model = mlxqwen.load(path, dtype=mx.float32).model
    cache = model.make_cache()
    logits = model(mx.array([prompt]), cache=cache)
    out = []
    for _ in range(n):
        out.append(int(mx.argmax(logits[0, -1])))
        logits = model(mx.array([out[-1:]]), cache=cache)
    return out


@pytest.fixture(scope="module", params=list(CASES), ids=str)
def converted(request, tmp_path_factory):
    arch, overrides = CASES[request.param]
    ref = build_reference(arch, vocab_size=VOCAB, **overrides)
    tmp = tmp_path_factory.mktemp(request.param)
    src = save_checkpoint(ref, tmp / "hf")
    return ref, src, to_gguf(src, tmp / "model-F32.gguf", "F32")


def test_f32_logits_match_transformers(converted):
    ref, _, path = converted
    got = llama_logits(path, TOKENS, f32_cache=True)
    assert rel_err(got, reference_logits(ref, TOKENS).numpy()) < F32_TOL


def test_f32_greedy_tokens_match_mlx(converted):
    _, src, path = converted
    assert greedy_llama(path, TOKENS[:8], 16) == greedy_mlx(src, TOKENS[:8], 16)


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    ref = build_reference("qwen3", vocab_size=VOCAB)
    return ref, save_checkpoint(ref, tmp_path_factory.mktemp("qwen3") / "hf")


@pytest.fixture
def qwen3_dir(qwen3):
    return qwen3[1]


def vocab_only(path: Path):
    return llama_cpp.Llama(str(path), vocab_only=True, verbose=False)


def test_tokenizer_matches_tokenizer_json(qwen3_dir, tmp_path):
    llm = vocab_only(to_gguf(qwen3_dir, tmp_path / "m.gguf", "F32"))
    vectors = TOKENIZER_DIR / "vectors"
    texts = (vectors / "qwen2.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")[:-1]
    expected = [[int(t) for t in line.split()] for line in (vectors / "qwen2.out").read_text().splitlines()]
    assert len(texts) == len(expected) > 40
    reference = Tokenizer.from_file(str(qwen3_dir / "tokenizer.json"))
    for text, ids in zip(texts, expected, strict=True):
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == ids == reference.encode(text).ids, text

    meta = llm.metadata
    assert (meta["tokenizer.ggml.model"], meta["tokenizer.ggml.pre"]) == ("gpt2", "qwen2")
    assert int(meta["tokenizer.ggml.eos_token_id"]) == reference.token_to_id("<|im_end|>")
    assert int(meta["tokenizer.ggml.padding_token_id"]) == reference.token_to_id("<|endoftext|>")
    assert meta["tokenizer.chat_template"] == (qwen3_dir / "chat_template.jinja").read_text()
    chat = "<|im_start|>user\n<think>hi</think><|im_end|>"
    assert llm.tokenize(chat.encode(), add_bos=False, special=True) == reference.encode(chat).ids
    # <think> is an added token that is not special: matched even in plain text, as tokenizers does
    thought = "<think>hi</think> <tool_call>"
    assert llm.tokenize(thought.encode(), add_bos=False, special=False) == reference.encode(thought).ids
    llm.close()


def test_qwen35_pre_tokenizer_is_detected(qwen3_dir, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(qwen3_dir, src)
    tok = json.loads((src / "tokenizer.json").read_text())
    split = tok["pre_tokenizer"]["pretokenizers"][0]["pattern"]
    split["Regex"] = (
        split["Regex"].replace(r"?\p{L}+", r"?[\p{L}\p{M}]+").replace(r"[^\s\p{L}\p{N}]", r"[^\s\p{L}\p{M}\p{N}]")
    )
    (src / "tokenizer.json").write_text(json.dumps(tok))
    llm = vocab_only(to_gguf(src, tmp_path / "m.gguf", "F32"))
    assert llm.metadata["tokenizer.ggml.pre"] == "qwen35"
    llm.close()


@pytest.fixture(scope="module")
def wide_qwen3(tmp_path_factory):
    """Rows of 256, so that llama.cpp's K-quants apply (they need multiples of 256)."""
    ref = build_reference("qwen3", vocab_size=VOCAB, hidden_size=256, intermediate_size=512, tie_word_embeddings=True)
    return ref, save_checkpoint(ref, tmp_path_factory.mktemp("wide") / "hf")


# quant -> (llama.cpp file type, bits per weight of the tensors as llama.cpp counts them, least cosine
# between its logits and fp32 transformers' (measured 0.9999996, 0.99998, 0.9998, 0.94; less a margin)).
# Q4_K_M runs on a 256-wide model; its tied embedding goes to Q6_K, hence about 6.5 bits per weight.
QUANT_CASES = {
    "F16": (gguf.LlamaFileType.MOSTLY_F16, (16, 16.05), 0.99999),
    "BF16": (gguf.LlamaFileType.MOSTLY_BF16, (16, 16.05), 0.9999),
    "Q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, (8.5, 8.55), 0.999),
    "Q4_K_M": (gguf.LlamaFileType.MOSTLY_Q4_K_M, (4.5, 6.6), 0.9),
}


@pytest.mark.parametrize("quant", list(QUANT_CASES))
def test_quantized_file_loads_and_generates(request, tmp_path, quant):
    ref, src = request.getfixturevalue("wide_qwen3" if quant == "Q4_K_M" else "qwen3")
    file_type, bits, min_cos = QUANT_CASES[quant]
    progress = make_progress(Console(file=io.StringIO()))
    with progress:
        options = format_options("gguf", {"quant": quant})
        output = tmp_path / GGUF.default_output("m", options)
        result = GGUF.convert(Source(src), output, options, force=False, progress=progress)
    assert result.output == output and output.name == f"m-{quant}.gguf" and result.recipe == quant
    assert all(task.finished for task in progress.tasks)
    assert [p.name for p in tmp_path.iterdir()] == [output.name]

    llm = open_gguf(output)
    assert int(llm.metadata["general.file_type"]) == file_type
    model_bits = 8 * llama_cpp.llama_model_size(llm.model) / llama_cpp.llama_model_n_params(llm.model)
    assert bits[0] <= model_bits <= bits[1] < result.bits_per_weight  # the file also holds the tokenizer
    llm.eval(TOKENS)
    got = np.array(llm.scores[: len(TOKENS)])
    assert min_cosine(got, reference_logits(ref, TOKENS).numpy()) > min_cos
    llm.reset()
    out = llm.create_completion("Hello", max_tokens=6, temperature=0.0)
    assert out["usage"]["completion_tokens"] == 6
    llm.close()


def test_mlx_quantized_source_is_dequantized(tmp_path):
    """An MLX (mlx-lm format) 4-bit directory converts to a GGUF that computes what MLX computes."""
    src = save_checkpoint(build_reference("qwen3_5_moe_text", vocab_size=VOCAB, **_LINEAR), tmp_path / "hf")
    model, _ = load_model(src, dtype=mx.float32, fused=False)  # mlx-lm's module tree, as files hold it
    nn.quantize(
        model,
        group_size=32,
        bits=4,
        class_predicate=lambda _, m: hasattr(m, "to_quantized") and m.weight.shape[-1] % 32 == 0,
    )
    dst = tmp_path / "mlx-4bit"
    dst.mkdir()
    mx.save_safetensors(str(dst / "model.safetensors"), dict(tree_flatten(model.parameters())))
    config = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**config, "quantization": {"group_size": 32, "bits": 4}}))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(src / name, dst / name)

    expected = np.array(mlxqwen.load(dst, dtype=mx.float32).model(mx.array([TOKENS]))[0])
    got = llama_logits(to_gguf(dst, tmp_path / "m.gguf", "F32"), TOKENS, f32_cache=True)
    assert rel_err(got, expected) < F32_TOL


def _edit_config(path: Path, **changes) -> Path:
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, **changes}))
    return path


@pytest.mark.parametrize(
    "arch, overrides, edit, message",
    [
        ("qwen3", {}, {"model_type": "llama"}, "model_type 'llama' is not supported"),
        ("qwen3_moe", {"norm_topk_prob": False}, {}, "norm_topk_prob"),
        ("qwen3_5_text", {}, {}, "linear_key_head_dim differs from linear_value_head_dim"),
        (
            "qwen3_5_text",
            _LINEAR,
            {"rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.25, "mrope_section": [2, 2, 0]}},
            re.escape("mrope_section [2, 2, 0] needs 8 rotary dims"),
        ),
    ],
    ids=["unknown-arch", "unnormalized-topk", "qwen35-head-dims", "mrope-too-wide"],
)
def test_unsupported_models_fail_with_one_line(tmp_path, arch, overrides, edit, message):
    src = _edit_config(save_checkpoint(build_reference(arch, **overrides), tmp_path / "hf", tokenizer=False), **edit)
    out = tmp_path / "out"
    with pytest.raises(ConvertError, match=message) as info:
        to_gguf(src, out / "m.gguf", "Q8_0")
    assert "\n" not in str(info.value) and "config.json" in str(info.value)
    assert not out.exists() or not any(out.iterdir())


def test_failure_midway_leaves_nothing(qwen3_dir, tmp_path, monkeypatch):
    calls = []

    def failing(data, qtype):
        calls.append(qtype)
        if len(calls) == 3:
            raise OSError("No space left on device")
        return data.astype(np.float32)

    monkeypatch.setattr(gguf.quants, "quantize", failing)
    with pytest.raises(OSError, match="No space"):
        to_gguf(qwen3_dir, tmp_path / "m.gguf", "F32")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_and_unknown_quant(qwen3_dir, tmp_path, capsys):
    out = tmp_path / "m.gguf"
    out.write_text("keep me")
    with pytest.raises(ConvertError, match="already exists; pass force=True to replace it"):
        to_gguf(qwen3_dir, out, "F32")
    assert out.read_text() == "keep me"
    with pytest.raises(ConvertError, match=r"quant='Q3_X': expected one of .*Q4_K_M"):
        to_gguf(qwen3_dir, tmp_path / "n.gguf", "Q3_X")
    assert main(["convert", str(qwen3_dir), "--to", "gguf", "-o", str(out)]) == 1
    assert capsys.readouterr().err == f"mlxqwen convert: error: {out}: already exists; pass --force to replace it\n"


def test_cli_writes_gguf(qwen3_dir, tmp_path, capsys):
    out = tmp_path / "model-F32.gguf"
    assert main(["convert", str(qwen3_dir), "--to", "gguf", "--quant", "F32", "-o", str(out)]) == 0
    reader = gguf.GGUFReader(out)
    assert reader.fields["general.architecture"].contents() == "qwen3"
    assert capsys.readouterr().out.startswith(f"{out}: F32, ")


def test_output_without_the_gguf_suffix_still_runs(qwen3_dir, tmp_path):
    """A GGUF is recognised by its first bytes, whatever its name."""
    out = tmp_path / "my-model"
    assert main(["convert", str(qwen3_dir), "--to", "gguf", "--quant", "F32", "-o", str(out)]) == 0
    llm = mlxqwen.load(out)
    assert llm.name == "llama.cpp"
    llm.close()
    assert main(["generate", str(out), "-p", "Hi", "--max-tokens", "2", "--no-think"]) == 0


def test_fp8_source_converts_as_mlx_does(tmp_path):
    """One source reader for every format: Qwen's FP8 releases are dequantized for GGUF too."""
    ref = build_reference("qwen3", vocab_size=VOCAB)
    src = save_checkpoint(ref, tmp_path / "hf")
    dequantized = to_fp8(src, (32, 48))
    ref.load_state_dict(dequantized, strict=False)
    got = llama_logits(to_gguf(src, tmp_path / "m.gguf", "F32"), TOKENS, f32_cache=True)
    assert rel_err(got, reference_logits(ref, TOKENS).numpy()) < F32_TOL
