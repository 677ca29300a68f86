"""Structured output: greedy decoding of random models under the JSON mask always yields JSON
that parses and validates, with the real Qwen tokenizer (tokenizer.json) and a GGUF vocabulary."""

import json

import jsonschema
import mlx.core as mx
import numpy as np
import pytest
from checkpoints import TOKENIZER_DIR, build_reference, save_checkpoint

import mlxqwen
from mlxqwen import demo
from mlxqwen.structured import JsonConstraint, grammar
from mlxqwen.tokenizer import Tokenizer

# every string, number and list bounded, so that a random model must reach the end
SCHEMAS = [
    {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "admin": {"type": "boolean"},
        },
        "required": ["name", "age", "admin"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "color": {"enum": ["red", "green", "blue"]},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "minItems": 1, "maxItems": 3},
            "point": {
                "type": "object",
                "properties": {"x": {"type": "integer", "minimum": -9, "maximum": 9}, "y": {"type": "null"}},
                "required": ["x", "y"],
                "additionalProperties": False,
            },
        },
        "required": ["color", "tags", "point"],
        "additionalProperties": False,
    },
    {
        "type": "array",
        "items": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 99}, {"const": "none"}]},
        "minItems": 2,
        "maxItems": 4,
    },
]


def constrained_greedy(llm, prompt: list[int], constraint: JsonConstraint, limit: int = 300) -> str:
    """Greedy decoding with the mask applied to the logits, until an end-of-sequence token
    (the model's runtime driven directly, as the engine does)."""
    eos, runtime = llm.tokenizer.eos_token_ids, llm.runtime
    seq = runtime.new_sequence()
    runtime.prefill(seq, prompt[:-1])
    logits = runtime.decode([seq], mx.array(prompt[-1:]))[0]
    out = []
    for _ in range(limit):
        token = int(mx.argmax(mx.where(constraint.mask(), logits, -mx.inf)))
        constraint.advance(token)
        if token in eos:
            assert constraint.finished
            return llm.tokenizer.decode(out)
        out.append(token)
        logits = runtime.decode([seq], mx.array([token]))[0]
    raise AssertionError(f"no end after {limit} tokens: {llm.tokenizer.decode(out)!r}")


@pytest.fixture(scope="module")
def qwen_tokenizer_model(tmp_path_factory):
    """A tiny random Qwen3 with the real Qwen tokenizer's whole vocabulary."""
    vocab = Tokenizer.from_dir(TOKENIZER_DIR).vocab_size
    ref = build_reference("qwen3", vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2)
    return mlxqwen.load(save_checkpoint(ref, tmp_path_factory.mktemp("qwen3-vocab")))


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("schema", SCHEMAS, ids=["person", "nested", "array"])
def test_random_model_under_a_schema_writes_valid_json(qwen_tokenizer_model, schema, seed):
    llm = qwen_tokenizer_model
    prompt = llm.tokenizer.encode(f"<|im_start|>user\nJSON please ({seed})<|im_end|>\n<|im_start|>assistant\n")
    text = constrained_greedy(llm, prompt, JsonConstraint(llm.tokenizer, schema))
    jsonschema.validate(json.loads(text), schema)


@pytest.mark.parametrize("kind", ["mlx", "gguf"])
def test_demo_model_under_a_schema_on_both_backends(kind):
    """The demo's own vocabulary, read from tokenizer.json (MLX) and from the GGUF (llama.cpp)."""
    if kind == "gguf":
        pytest.importorskip("llama_cpp")
    llm = mlxqwen.load(demo.model_path(kind), backend="mlx" if kind == "mlx" else "llama.cpp")
    schema = {
        "type": "object",
        "properties": {"answer": {"type": "integer", "minimum": 0, "maximum": 999}},
        "required": ["answer"],
        "additionalProperties": False,
    }
    prompt = llm.tokenizer.encode(llm.prompt_text("What is 12 + 30?", think=False))
    text = constrained_greedy(llm, prompt, JsonConstraint(llm.tokenizer, schema))
    jsonschema.validate(json.loads(text), schema)


def test_json_mode_allows_only_json_and_then_only_eos():
    tokenizer = Tokenizer.from_dir(TOKENIZER_DIR)
    constraint = JsonConstraint(tokenizer, "json", vocab_size=151936)
    first = np.array(constraint.mask())
    assert first.shape == (151936,) and not first[151669:].any()  # padded ids beyond the vocabulary
    assert first[tokenizer.encode("{")[0]] and not first[tokenizer.encode("[")[0]]  # an object
    assert not first[min(tokenizer.eos_token_ids)] and not constraint.accepting
    for token in tokenizer.encode('{"a":[1,"x"]}'):
        assert np.array(constraint.mask())[token]
        constraint.advance(token)
    assert constraint.accepting and constraint.finished
    assert np.flatnonzero(np.array(constraint.mask())).tolist() == sorted(tokenizer.eos_token_ids)
    with pytest.raises(ValueError, match="does not continue the JSON"):
        constraint.advance(tokenizer.encode("x")[0])


def test_bad_formats_are_refused_in_one_line():
    with pytest.raises(ValueError, match="unusable JSON schema"):
        grammar({"type": "nonsense"})
    with pytest.raises(ValueError, match="use 'json' or a JSON schema"):
        grammar("yaml")
    with pytest.raises(ValueError, match="format="):
        mlxqwen.GenerationOptions(format=["json"])
