"""Tokenizer: the real Qwen vocabulary against llama.cpp's test vectors, special tokens, EOS ids,
sentencepiece checkpoints, and a streaming detokenizer that joins to the one-shot decode."""

from __future__ import annotations

import io
import json
import random
import shutil

import pytest
from checkpoints import TOKENIZER_DIR

from mlxqwen import ModelLoadError
from mlxqwen.tokenizer import Tokenizer

TEXTS = [
    "Hello, world! Ünïcödé façade — 你好，世界 🎉🦙 ∑∫√ こんにちは 안녕하세요",
    "def f(x):\n    return x ** 2  # ½ ⅓ ¼\n\n\t<think>no</think>",
    "ꙮ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 🧬⚗️ ᚠᛇᚻ᛫ᛒᛦᚦ " * 3,
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_dir(TOKENIZER_DIR)


def stream(tokenizer: Tokenizer, ids: list[int], skip_special_tokens: bool = True) -> list[str]:
    detok = tokenizer.detokenizer(skip_special_tokens)
    pieces = [detok.add(i) for i in ids]
    return pieces + [detok.flush()]


def test_llama_cpp_vectors(tok):
    texts = (TOKENIZER_DIR / "vectors" / "qwen2.inp").read_text().split("\n__ggml_vocab_test__\n")
    expected = (TOKENIZER_DIR / "vectors" / "qwen2.out").read_text().split("\n")
    assert len(texts) == len(expected) == 47
    for text, ids in zip(texts, expected, strict=True):
        assert tok.encode(text) == [int(i) for i in ids.split()], text


def test_special_tokens_and_eos(tok, tmp_path):
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == 151644 and ids[-1] == 151645
    assert {151643, 151644, 151645} <= tok.special_token_ids
    assert 151667 not in tok.special_token_ids  # <think> is an added token, not a special one
    assert tok.eos_token_ids == {151645}
    assert tok.decode(ids, skip_special_tokens=True) == "user\nhi"

    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TOKENIZER_DIR / name, tmp_path / name)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [151645, 151643]}))
    assert Tokenizer.from_dir(tmp_path).eos_token_ids == {151645, 151643}
    (tmp_path / "generation_config.json").write_text("{bad")
    with pytest.raises(ModelLoadError, match="generation_config.json"):
        Tokenizer.from_dir(tmp_path)


def test_missing_tokenizer(tmp_path):
    with pytest.raises(ModelLoadError, match="tokenizer"):
        Tokenizer.from_dir(tmp_path)


@pytest.mark.parametrize("text", TEXTS)
def test_streaming_equals_one_shot(tok, text):
    ids = tok.encode(text)
    assert any("\ufffd" in tok.decode([i]) for i in ids), "the text should split characters across tokens"
    pieces = stream(tok, ids)
    assert "".join(pieces) == tok.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)


def test_streaming_random_tokens_and_specials(tok):
    rng = random.Random(0)
    for _ in range(20):
        ids = [rng.randrange(151669) for _ in range(40)]
        assert "".join(stream(tok, ids)) == tok.decode(ids, skip_special_tokens=True)
        assert "".join(stream(tok, ids, False)) == tok.decode(ids)


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory):
    sentencepiece = pytest.importorskip("sentencepiece")
    path = tmp_path_factory.mktemp("sp")
    corpus = ["Hello world, this is a tiny corpus.", "The quick brown fox jumps over the lazy dog.", "café naïve"] * 50
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_writer=model,
        vocab_size=300,
        model_type="bpe",
        byte_fallback=True,
        minloglevel=2,
    )
    (path / "tokenizer.model").write_bytes(model.getvalue())
    config = {
        "eos_token": "</s>",
        "bos_token": "<s>",
        "added_tokens_decoder": {
            "2": {"content": "</s>", "special": True},
            "300": {"content": "<|im_start|>", "special": True},
            "301": {"content": "<|im_end|>", "special": True},
            "302": {"content": "<think>", "special": False},
        },
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


def test_sentencepiece_checkpoint(sp_dir):
    tok = Tokenizer.from_dir(sp_dir)
    assert tok.eos_token_ids == {2}
    assert tok.vocab_size == 303
    text = "<|im_start|>Hello 你好 🎉 world<think>x<|im_end|>"
    ids = tok.encode(text)
    assert ids[0] == 300 and 302 in ids and ids[-1] == 301
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=True) == "Hello 你好 🎉 world<think>x"
    assert tok.token_to_id("<|im_end|>") == 301 and tok.id_to_token(302) == "<think>"
    pieces = stream(tok, ids)
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True)
    assert not any("\ufffd" in p for p in pieces)
