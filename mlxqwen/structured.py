"""Structured output: which tokens may come next so that the reply is JSON, optionally valid
under a JSON schema, enforced while sampling (a token mask) with llguidance.

llguidance compiles the schema into a grammar and, at every step, gives the set of tokens
that keep the text a prefix of a valid document, from the model's own vocabulary: a
`tokenizer.json` (Hugging Face `tokenizers`) or a GGUF's vocabulary as llama.cpp runs it.
The JSON is compact (no free whitespace between tokens), so a reply cannot wander into
endless blank space; once the document is complete, only an end-of-sequence token may follow."""

from __future__ import annotations

import sys
import threading
import warnings
import weakref
from collections.abc import Mapping
from typing import Any

import llguidance
import mlx.core as mx
import numpy as np

from .tokenizer import _HF, Tokenizer

Format = str | Mapping[str, Any]

_OPTIONS = {"whitespace_flexible": False}
_tokenizers: weakref.WeakKeyDictionary[Tokenizer, llguidance.LLTokenizer] = weakref.WeakKeyDictionary()
_tokenizers_lock = threading.Lock()


def schema_of(format: Format) -> dict[str, Any]:
    """The JSON schema `format` asks for: "json" is any JSON object (as Ollama's and OpenAI's
    JSON modes), a dict is the schema itself."""
    if format == "json":
        return {"type": "object"}
    if isinstance(format, Mapping):
        return dict(format)
    raise ValueError(f"format={format!r}: use 'json' or a JSON schema (an object)")


def grammar(format: Format) -> str:
    """llguidance's grammar for `format`; a schema it cannot compile raises a one-line ValueError."""
    compiled = llguidance.LLMatcher.grammar_from_json_schema(schema_of(format), defaults=_OPTIONS)
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(compiled)
    if is_error:
        raise ValueError(f"format: unusable JSON schema ({messages[0]})")
    return compiled


def _ll_tokenizer(tokenizer: Tokenizer) -> llguidance.LLTokenizer:
    """The vocabulary as llguidance reads it (built once per tokenizer: about 2 s for Qwen's)."""
    with _tokenizers_lock:
        if tokenizer in _tokenizers:
            return _tokenizers[tokenizer]
        backend, eos = tokenizer.backend, sorted(tokenizer.eos_token_ids)
        llama = sys.modules.get("mlxqwen.backends.llama_cpp")  # loaded wherever a GGUF vocabulary exists
        if isinstance(backend, _HF):
            built = llguidance.LLTokenizer(backend.tok.to_str(), eos_token=eos)
        elif llama is not None and isinstance(backend, llama._Vocab):
            from llguidance.llamacpp import lltokenizer_from_vocab

            with warnings.catch_warnings():  # it calls llama.cpp's older name for llama_vocab_get_attr
                warnings.simplefilter("ignore", DeprecationWarning)
                built = lltokenizer_from_vocab(backend.vocab, eos_token=eos)
        else:
            raise ValueError("structured output needs the model's tokenizer.json or a GGUF vocabulary")
        _tokenizers[tokenizer] = built
        return built


class JsonConstraint:
    """The tokens allowed next while generating JSON for `format` ("json" or a JSON schema).

    `mask()` is a bool array over `vocab_size` ids (the logits' width; default the tokenizer's);
    `advance(token)` records the token drawn; `accepting` says the JSON is complete (an
    end-of-sequence token is allowed), `finished` that nothing but one may follow."""

    def __init__(self, tokenizer: Tokenizer, format: Format, vocab_size: int | None = None):
        ll = _ll_tokenizer(tokenizer)
        self.matcher = llguidance.LLMatcher(ll, grammar(format), log_level=0)
        if self.matcher.is_error():
            raise ValueError(f"format: unusable JSON schema ({self.matcher.get_error()})")
        self.vocab_size = vocab_size or ll.vocab_size

    def mask(self) -> mx.array:
        bits = np.unpackbits(np.frombuffer(self.matcher.compute_bitmask(), np.uint8), bitorder="little")
        allowed = np.zeros(self.vocab_size, bool)
        n = min(self.vocab_size, bits.size)
        allowed[:n] = bits[:n]
        return mx.array(allowed)

    def advance(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise ValueError(f"token {token} does not continue the JSON ({self.matcher.get_error()})")

    @property
    def accepting(self) -> bool:
        return self.matcher.is_accepting()

    @property
    def finished(self) -> bool:
        return self.matcher.is_stopped()
