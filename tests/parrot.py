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
from scripted import ScriptedRuntime, scripted_llm

from mlxqwen.chat_template import ChatTemplate
from mlxqwen.llm import LLM
from mlxqwen.tokenizer import Tokenizer

FIXTURES = Path(__file__).parent / "fixtures"
_SAY = re.compile(r"say: (.*?)<\|im_end\|>", re.S)


class Parrot(ScriptedRuntime):
    """Each reply is the text after the last "say: " of the prompt (up to its <|im_end|>), then EOS;
    to "say the prompt", it repeats what the template wrote after the last assistant header.
    `delay`: seconds per decoding step."""

    name = "parrot"

    def __init__(self, tokenizer: Tokenizer, delay: float = 0.0):
        super().__init__(tokenizer, max_context=4096)
        self.delay = delay

    def _next(self, seq) -> mx.array:
        if seq.step == 0:
            prompt = self.tokenizer.decode(seq.tokens)
            said = _SAY.findall(prompt)
            if "say the prompt<|im_end|>" in prompt:
                said = [prompt.rsplit("<|im_start|>assistant\n", 1)[-1]]
            seq.reply = self.tokenizer.encode(said[-1] if said else "") + [self.eos]
        token = seq.reply[min(seq.step, len(seq.reply) - 1)]
        seq.step += 1
        return mx.zeros(self.tokenizer.vocab_size).at[token].add(100.0)

    def decode(self, seqs, tokens: mx.array) -> mx.array:
        time.sleep(self.delay)
        return super().decode(seqs, tokens)


def parrot(levels: bool = False, delay: float = 0.0) -> LLM:
    tokenizer = Tokenizer.from_dir(FIXTURES / "qwen3-tokenizer")
    if levels:
        tokenizer.chat_template = ChatTemplate((FIXTURES / "qwen3.8-style" / "chat_template.jinja").read_text())
    return scripted_llm(Parrot(tokenizer, delay))


def main(port: int, api_key: str | None = None) -> None:
    import uvicorn

    from mlxqwen.library import LocalModel
    from mlxqwen.server import ModelPool, create_app, log_to_stderr

    paths = {"parrot": FIXTURES / "qwen3-tokenizer", "parrot-levels": FIXTURES / "qwen3.8-style"}
    models = [LocalModel(name, path, "mlx", "path", 1000, 0.0, "fp32") for name, path in paths.items()]
    pool = ModelPool(
        models, keep_alive=None, load=lambda path: parrot(levels=path == paths["parrot-levels"], delay=0.01)
    )
    log_to_stderr()
    uvicorn.run(create_app(pool, api_key=api_key), host="127.0.0.1", port=port, log_level="warning")


if __name__ == "__main__":
    main(int(sys.argv[1]), *sys.argv[2:3])
