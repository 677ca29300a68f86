"""Contexts past the one a model was trained for: refused with the model's limit, unless YaRN
extends it the way Qwen documents it (rope_scaling type yarn, factor, original length), on
both runtimes, where the logits then match transformers with the same rope_scaling; the
option reaches `load`, `generate`, `chat` and `fit`."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from checkpoints import build_reference, reference_logits, save_checkpoint

import mlxqwen
from mlxqwen import ModelLoadError
from mlxqwen.cli import main
from mlxqwen.config import parse_yarn

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}
TOKENS = [int(t) for t in np.random.RandomState(3).randint(0, 151_600, 40)]  # past 16 positions
TOL = 1e-5  # fp32 on both sides; measured <= 8e-7 relative to the largest logit
ARCHS = {
    "qwen2": {},
    "qwen3": {},
    "qwen3_moe": {},
    "qwen3_5_text": {"linear_value_head_dim": 16},  # llama.cpp's Qwen3.5 needs K and V heads of one size
    "qwen3_5_moe_text": {"linear_value_head_dim": 16},
}


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module", params=list(ARCHS))
def extended(request, tmp_path_factory):
    """A checkpoint without rope scaling, and transformers' logits for the same weights with YaRN."""
    arch, overrides = request.param, ARCHS[request.param]
    plain = build_reference(arch, vocab_size=151936, **overrides)
    path = save_checkpoint(plain, tmp_path_factory.mktemp(arch) / "hf")
    scaled = build_reference(arch, vocab_size=151936, rope_scaling=YARN, **overrides)  # same seed: same weights
    expected = reference_logits(scaled, TOKENS).numpy()
    assert rel_err(reference_logits(plain, TOKENS).numpy(), expected) > 100 * TOL  # YaRN changes them
    return path, expected


def test_yarn_on_mlx_matches_transformers(extended):
    path, expected = extended
    llm = mlxqwen.load(path, backend="mlx", dtype=mx.float32, rope_scaling=YARN)
    assert llm.max_context == 64  # 4 x 16
    assert rel_err(np.array(llm.model(mx.array([TOKENS]))[0]), expected) < TOL


def test_yarn_on_llama_cpp_matches_transformers(extended, tmp_path):
    pytest.importorskip("llama_cpp")
    pytest.importorskip("gguf")
    from checkpoints import to_gguf

    path, expected = extended
    llm = mlxqwen.load(to_gguf(path, tmp_path / "m.gguf", "F32"), dtype=mx.float32, rope_scaling=YARN)
    assert (llm.name, llm.max_context) == ("llama.cpp", 64)
    runtime = llm.runtime
    seq = runtime.new_sequence()
    got = np.stack([np.array(runtime.decode([seq], mx.array([t]))[0]) for t in TOKENS])
    llm.close()
    assert rel_err(got, expected) < TOL


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_checkpoint(build_reference("qwen3", vocab_size=151936), tmp_path_factory.mktemp("m"))


def test_past_the_trained_context_only_with_yarn(model_dir, capsys):
    hint = r'extend it with YaRN: rope_scaling=\{"rope_type": "yarn", "factor": 73.3\}$'
    with pytest.raises(ModelLoadError, match=r"max_context=300000 is past the 4,096 tokens this model handles; "
                       r"max_context=4096 fits, or " + hint):  # fmt: skip
        mlxqwen.load(model_dir, max_context=300000)
    with pytest.raises(ModelLoadError, match=r"max_context=300000 is past the 16,384 tokens"):
        mlxqwen.load(model_dir, max_context=300000, rope_scaling={"rope_type": "yarn", "factor": 4})
    llm = mlxqwen.load(model_dir, max_context=300000, rope_scaling={"type": "yarn", "factor": 73.3})
    assert llm.max_context == 300000 and llm.config.rope.type == "yarn"
    assert mlxqwen.load(model_dir, rope_scaling={"rope_type": "yarn", "factor": 2.0}).max_context == 8192

    args = ["generate", str(model_dir), "-p", "Hi", "--raw", "--max-tokens", "2", "--max-context", "8192"]
    assert main(args) == 1
    hint = """extend it with YaRN: --rope-scaling '{"rope_type": "yarn", "factor": 2.0}'"""  # the command line's words
    assert capsys.readouterr().err == (
        f"mlxqwen generate: error: {model_dir}: --max-context 8192 is past the 4,096 tokens this model handles; "
        f"--max-context 4096 fits, or {hint}\n"
    )
    assert main([*args, "--rope-scaling", '{"rope_type": "yarn", "factor": 2.0}']) == 0
    assert main(["fit", str(model_dir), "--context", "8192"]) == 1
    assert capsys.readouterr().out.splitlines()[-1] == f"past the 4,096 tokens this model handles; {hint}"
    assert main(["fit", str(model_dir), "--context", "8192", "--rope-scaling", json.dumps(YARN)]) == 1  # 64 tokens
    assert main(["fit", str(model_dir), "--context", "8192", "--rope-scaling", '{"type": "yarn", "factor": 2}']) == 0


def test_chat_passes_the_context_options_to_the_app(model_dir, monkeypatch):
    from mlxqwen.tui import app

    seen = {}

    class App:
        def __init__(self, model, resume, loader):
            seen["llm"] = loader(model)
            self.return_code, self.engine_stopped = 0, True

        def run(self):
            pass

    monkeypatch.setattr(app, "ChatApp", App)
    assert (
        main(["chat", str(model_dir), "--max-context", "6000", "--rope-scaling", '{"rope_type": "yarn", "factor": 2}'])
        == 0
    )
    assert seen["llm"].max_context == 6000 and seen["llm"].config.rope.factor == 2.0


@pytest.mark.parametrize(
    "value, message",
    [
        ({"rope_type": "linear", "factor": 2}, "rope type 'linear'; context extension takes YaRN"),
        ({"rope_type": "yarn"}, "factor=None; give a number above 1"),
        ({"rope_type": "yarn", "factor": 0.5}, "factor=0.5"),
        ({"rope_type": "yarn", "factor": 2, "original_max_position_embeddings": "4k"}, "original_max_position_embe"),
        ({"rope_type": "yarn", "factor": 2, "beta": 1}, "unknown key 'beta'"),
        ("yarn", "expected a mapping"),
    ],
)
def test_rope_scaling_is_checked(value, message):
    with pytest.raises(ValueError, match=message):
        parse_yarn(value)
