"""The generation engine against mlx-lm, on the same 4-bit Qwen3.5-shaped model (random
weights, the real Qwen tokenizer), in the same run.

1. Decode tokens/s: `mlxqwen` `llm.stream` against `mlx_lm.stream_generate`, greedy, same
   prompt tokens, same compute dtype (mlx-lm's bf16 scales are cast like ours).
2. Time to first token at turn 1 and turn N of a chat: `ChatSession` (feeds only the new
   turn) against re-sending the whole conversation each turn (what a stateless API does),
   both through mlxqwen, and against `mlx_lm.stream_generate` on the whole conversation.

    python benchmarks/bench_generate.py [--hidden 1024 --layers 8 --decode 64 --turns 10]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import mlx.core as mx
from common import print_table, qwen3_5_config, write_checkpoint
from mlx.utils import tree_map

import mlxqwen
from mlxqwen.events import TextDelta, ThinkingDelta

TOKENIZER = Path(__file__).parent.parent / "tests" / "fixtures" / "qwen3-tokenizer"
WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex the jovial bumpkin".split()


def user_message(turn: int, words: int) -> str:
    return " ".join(WORDS[(turn * 7 + i) % len(WORDS)] for i in range(words)) + "?"


def mlx_lm_run(model, tokenizer, prompt: list[int], max_tokens: int) -> tuple[float, float, int]:
    """(time to first token, decode tok/s, tokens) of one mlx_lm.stream_generate call."""
    from mlx_lm import stream_generate

    start = time.perf_counter()
    first = last = None
    n = 0
    for response in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens):
        last = time.perf_counter()
        first = first or last
        n = response.generation_tokens
    return first - start, (n - 1) / (last - first), n


def mlxqwen_run(events) -> tuple[float, float, int]:
    """The same figures from an mlxqwen event stream (decode timed here, as for mlx-lm)."""
    first = last = None
    for event in events:
        if isinstance(event, (TextDelta, ThinkingDelta)) or isinstance(event, mlxqwen.Done):
            last = time.perf_counter()
            first = first or last
    n = event.stats.generated_tokens
    return event.stats.ttft, (n - 1) / (last - first), n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=64, help="words in the decode benchmark's prompt")
    ap.add_argument("--decode", type=int, default=64, help="tokens generated in the decode benchmark")
    ap.add_argument("--turns", type=int, default=10)
    ap.add_argument("--words", type=int, default=60, help="words per chat message")
    ap.add_argument("--reply", type=int, default=24, help="tokens per chat reply")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from mlx_lm.tokenizer_utils import load as load_tokenizer
    from mlx_lm.utils import load_model as mlx_lm_load_model

    dtype = mx.bfloat16 if mx.default_device() == mx.gpu else mx.float32
    with tempfile.TemporaryDirectory() as tmp:
        path = write_checkpoint(Path(tmp) / "q4", qwen3_5_config(args.hidden, args.layers))
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            shutil.copy(TOKENIZER / name, path / name)
        size_mb = (path / "model.safetensors").stat().st_size / 1e6
        theirs, _ = mlx_lm_load_model(path)
        theirs.update(tree_map(lambda x: x.astype(dtype) if x.dtype == mx.bfloat16 else x, theirs.parameters()))
        their_tokenizer = load_tokenizer(path)
        llm = mlxqwen.load(path, dtype=dtype, max_context=32768)

        # 1. decode speed
        text = user_message(0, args.prompt)
        prompt = llm.tokenizer.encode(text)
        ref, got = [], []
        for _ in range(args.repeats):  # interleaved, best of each
            ref.append(mlx_lm_run(theirs, their_tokenizer, prompt, args.decode))
            got.append(mlxqwen_run(llm.stream(text, raw=True, temperature=0, max_tokens=args.decode)))
        ref_tps, got_tps = max(r[1] for r in ref), max(g[1] for g in got)
        print_table(
            f"Decode, Qwen3.5-shaped 4-bit model, {size_mb:.0f} MB, {args.layers} layers, hidden {args.hidden}, "
            f"{len(prompt)}-token prompt, {args.decode} tokens, {dtype}, {mx.default_device()}",
            ["engine", "decode tok/s", "ratio"],
            [
                ["mlx_lm.stream_generate", ref_tps, "1.00"],
                ["mlxqwen llm.stream", got_tps, f"{got_tps / ref_tps:.2f}"],
            ],
        )

        # 2. time to first token over a chat
        chat = llm.chat(temperature=0, max_tokens=args.reply, think=False)
        messages: list[dict] = []
        rows = []
        for turn in range(1, args.turns + 1):
            message = user_message(turn, args.words)
            done = mlxqwen.llm.last(chat.stream(message))
            full = messages + [{"role": "user", "content": message}]
            restart = mlxqwen_run(llm.stream(full, think=False, temperature=0, max_tokens=args.reply))
            full_prompt = llm.tokenizer.encode(llm.prompt_text(full, think=False))
            baseline = mlx_lm_run(theirs, their_tokenizer, full_prompt, args.reply)
            messages = full + [done.to_message()]
            if turn in (1, args.turns):
                rows.append(
                    [
                        f"turn {turn}",
                        done.stats.prompt_tokens,
                        done.stats.ttft * 1000,
                        len(full_prompt),
                        restart[0] * 1000,
                        baseline[0] * 1000,
                    ]
                )
        print_table(
            f"Time to first token in a chat ({args.words}-word messages, {args.reply}-token replies)",
            [
                "",
                "ChatSession prefill tokens",
                "ChatSession ttft ms",
                "whole-chat tokens",
                "mlxqwen whole chat ttft ms",
                "mlx-lm whole chat ttft ms",
            ],
            rows,
        )


if __name__ == "__main__":
    main()
