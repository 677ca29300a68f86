"""A model that says what the last user message asks it to ("say: TEXT"), for testing the
server's dialects with exact replies (thinking, tool calls, lengths) through a real HTTP
stack. `python tests/parrot.py PORT` serves two of them, "parrot" (Qwen3.5's template:
thinking on/off, XML tool calls) and "parrot-levels" (a Qwen3.8-style template with thinking
levels), with `mlxqwen.server` on uvicorn."""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import mlx.core as mx

from mlxqwen.chat_template import ChatTemplate
from mlxqwen.engine import Backend, GenerationOptions
from mlxqwen.tokenizer import Tokenizer

FIXTURES = Path(__file__).parent / "fixtures"
_SAY = re.compile(r"say: (.*?)<\|im_end\|>", re.S)


class _Tape:
    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.script: list[int] | None = None


class Parrot(Backend):
    """Each reply is the text after the last "say: " of the prompt (up to its <|im_end|>), then EOS;
    to "say the prompt", it repeats what the template wrote after the last assistant header.
    `delay`: seconds per generated token."""

    name = "parrot"

    def __init__(self, tokenizer: Tokenizer, delay: float = 0.0):
        self.tokenizer = tokenizer
        self.defaults = GenerationOptions(temperature=0)
        self.max_context = 4096
        self.eos = min(tokenizer.eos_token_ids)
        self.delay = delay

    def new_cache(self) -> _Tape:
        return _Tape()

    def prefill(self, cache: _Tape, tokens: list[int]) -> None:
        cache.tokens.extend(tokens)

    def forward(self, cache: _Tape, tokens: mx.array) -> mx.array:
        self.prefill(cache, tokens.tolist())
        if cache.script is None:
            prompt = self.tokenizer.decode(cache.tokens)
            said = _SAY.findall(prompt)
            if "say the prompt<|im_end|>" in prompt:
                said = [prompt.rsplit("<|im_start|>assistant\n", 1)[-1]]
            cache.script = self.tokenizer.encode(said[-1] if said else "") + [self.eos]
        token = cache.script.pop(0) if cache.script else self.eos
        time.sleep(self.delay)
        return mx.zeros(self.tokenizer.vocab_size).at[token].add(100.0)

    def snapshot(self, cache: _Tape) -> int:
        return len(cache.tokens)

    def restore(self, cache: _Tape, snapshot: int) -> None:
        del cache.tokens[snapshot:]

    def settle(self, cache: _Tape) -> None:
        pass


def parrot(levels: bool = False, delay: float = 0.0) -> Parrot:
    tokenizer = Tokenizer.from_dir(FIXTURES / "qwen3-tokenizer")
    if levels:
        tokenizer.chat_template = ChatTemplate((FIXTURES / "qwen3.8-style" / "chat_template.jinja").read_text())
    return Parrot(tokenizer, delay)


def main(port: int, api_key: str | None = None) -> None:
    import uvicorn

    from mlxqwen.library import LocalModel
    from mlxqwen.server import ModelPool, create_app, log_to_stderr

    paths = {"parrot": FIXTURES / "qwen3-tokenizer", "parrot-levels": FIXTURES / "qwen3.8-style"}
    models = [LocalModel(name, path, "mlx", "path", 1000, 0.0, "fp32") for name, path in paths.items()]
    pool = ModelPool(models, keep_alive=None, load=lambda path: parrot(levels=path == paths["parrot-levels"]))
    log_to_stderr()
    uvicorn.run(create_app(pool, api_key=api_key), host="127.0.0.1", port=port, log_level="warning")


if __name__ == "__main__":
    main(int(sys.argv[1]), *sys.argv[2:3])
