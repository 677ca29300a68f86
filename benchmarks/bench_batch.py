"""Continuous batching and the prefix cache, MLX and llama.cpp, in one run.

1. Aggregate decode tokens/s with 1, 2, 4 and 8 requests at once (greedy), against one stream:
   the batch size over the median time between the engine's decode steps while all run.
2. The time of one decode step at batch 1..8 (the runtime alone), against batch 1.
3. Time to first token at turn 1 and turn N of a conversation sent whole each turn (as HTTP
   clients do): mlxqwen with its prefix cache, without it, and mlx-lm with its own prompt cache
   (reused when the previous turn's cache can be trimmed to the common prefix, as mlx-lm's
   server does; a Qwen3.5 cache cannot, so mlx-lm reads the whole conversation again).
4. A projection for Apple Silicon, where decoding is bound by memory bandwidth: a step reads the
   weights once for the whole batch plus each sequence's K/V and recurrent state. Computed from
   bytes (Qwen3.6-27B 4-bit at a 4k context, 546 GB/s), not measured.

Models: Qwen3.5-shaped, random weights, the real Qwen tokenizer; MLX 4-bit (mlx-lm's format)
and the same weights as GGUF Q4_K_M.

    python benchmarks/bench_batch.py [--hidden 1024 --layers 8 --decode 32 --turns 10]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import mlx.core as mx
from common import print_table, qwen3_5_config, write_checkpoint

import mlxqwen
from mlxqwen.config import parse_config
from mlxqwen.engine import Request
from mlxqwen.llm import last

TOKENIZER = Path(__file__).parent.parent / "tests" / "fixtures" / "qwen3-tokenizer"
WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex the jovial bumpkin".split()
STREAMS = (1, 2, 4, 8)


def words(seed: int, n: int) -> str:
    return " ".join(WORDS[(seed * 7 + i) % len(WORDS)] for i in range(n))


def aggregate_tps(llm, streams: int, decode: int) -> float:
    """Tokens per second while `streams` requests decode together: the batch size over the median
    time between the engine's decode steps at that size (sampling and detokenizing included)."""
    runtime, stamps = llm.runtime, []
    decode_step = runtime.decode

    def timed(seqs, tokens):
        stamps.append((time.perf_counter(), len(seqs)))
        return decode_step(seqs, tokens)

    runtime.decode = timed
    try:
        options = llm.options(temperature=0, max_tokens=decode)
        handles = [llm.engine.submit(Request(llm.tokenizer.encode(words(i, 24)), options)) for i in range(streams)]
        for handle in handles:
            last(iter(handle))
    finally:
        del runtime.decode
    full = [t for (t, n), (_, after) in zip(stamps, stamps[1:], strict=False) if n == after == streams]
    return streams / statistics.median(b - a for a, b in zip(full, full[1:], strict=False))


def step_times(llm, batch: int, repeats: int) -> float:
    """Median seconds of one decode step over `batch` sequences (the runtime alone)."""
    runtime = llm.runtime
    seqs = [runtime.new_sequence() for _ in range(batch)]
    for i, seq in enumerate(seqs):
        runtime.prefill(seq, llm.tokenizer.encode(words(i, 24)))
    tokens = mx.array([11] * batch)
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        mx.eval(runtime.decode(seqs, tokens))
        times.append(time.perf_counter() - start)
    for seq in seqs:
        runtime.release(seq)
    runtime.settle()
    return statistics.median(times[1:])


def stateless_ttft(llm, turns: int, n_words: int, reply: int) -> tuple[float, float, int]:
    """TTFT at turn 1 and at the last turn, and the prompt tokens read at the last turn."""
    messages, ttft = [{"role": "system", "content": "You are terse."}], []
    for turn in range(turns):
        messages.append({"role": "user", "content": words(turn, n_words) + "?"})
        done = last(llm.stream(messages, think=False, temperature=0, max_tokens=reply))
        ttft.append(done.stats.ttft)
        messages.append(done.to_message())
    return ttft[0], ttft[-1], done.stats.prompt_tokens


def mlx_lm_stateless_ttft(
    path: Path, llm, turns: int, n_words: int, reply: int, dtype: mx.Dtype
) -> tuple[float, float, int]:
    """The same conversation through mlx-lm, reusing its prompt cache where it can be trimmed."""
    from mlx.utils import tree_map
    from mlx_lm import stream_generate
    from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache, trim_prompt_cache
    from mlx_lm.tokenizer_utils import load as load_tokenizer
    from mlx_lm.utils import load_model

    model, _ = load_model(path)
    model.update(tree_map(lambda x: x.astype(dtype) if x.dtype == mx.bfloat16 else x, model.parameters()))
    tokenizer = load_tokenizer(path)
    messages, ttft = [{"role": "system", "content": "You are terse."}], []
    cache, cached = make_prompt_cache(model), []
    for turn in range(turns):
        messages.append({"role": "user", "content": words(turn, n_words) + "?"})
        prompt = llm.tokenizer.encode(llm.prompt_text(messages, think=False))
        common = next(
            (i for i, (a, b) in enumerate(zip(cached, prompt, strict=False)) if a != b), min(len(cached), len(prompt))
        )
        common = min(common, len(prompt) - 1)
        if common and can_trim_prompt_cache(cache):
            trim_prompt_cache(cache, len(cached) - common)
        else:
            cache, common = make_prompt_cache(model), 0
        start, first, text = time.perf_counter(), None, []
        for response in stream_generate(model, tokenizer, prompt[common:], max_tokens=reply, prompt_cache=cache):
            first = first or time.perf_counter()
            text.append(response.text)
        ttft.append(first - start)
        cached = prompt + llm.tokenizer.encode("".join(text))
        messages.append({"role": "assistant", "content": "".join(text)})
    return ttft[0], ttft[-1], len(prompt) - common


def projection(streams: int) -> tuple[float, float]:
    """Projected aggregate decode tok/s of Qwen3.6-27B 4-bit on an M4 Max (546 GB/s) at a 4k
    context, and its ratio to one stream: a step reads the weights once, K/V and state per sequence."""
    from mlxqwen import memory

    cfg = parse_config(
        {
            "model_type": "qwen3_5_text",
            "hidden_size": 5120,
            "num_hidden_layers": 64,
            "num_attention_heads": 24,
            "num_key_value_heads": 4,
            "head_dim": 256,
            "intermediate_size": 17408,
            "vocab_size": 248320,
            "linear_num_key_heads": 16,
            "linear_num_value_heads": 48,
            "linear_key_head_dim": 128,
            "linear_value_head_dim": 128,
            "linear_conv_kernel_dim": 4,
            "full_attention_interval": 4,
            "max_position_embeddings": 262144,
        }
    )
    plan = memory.mlx_estimate(cfg, 4096, weights=int(15.5e9), dtype=mx.bfloat16)
    per_sequence = plan.kv_cache + plan.recurrent_state
    step = (plan.weights + streams * per_sequence) / 546e9
    one = (plan.weights + per_sequence) / 546e9
    return streams / step, (streams / step) / (1 / one)


def build(tmp: Path, hidden: int, layers: int, backends: list[str]) -> dict[str, Path]:
    """The MLX 4-bit checkpoint and, for llama.cpp, the same weights as GGUF Q4_K_M."""
    path = write_checkpoint(tmp / f"q4-{hidden}", qwen3_5_config(hidden, layers))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(TOKENIZER / name, path / name)
    models = {"mlx": path}
    if "llama.cpp" in backends:
        from mlxqwen.convert import convert

        models["llama.cpp"] = convert(path, tmp / f"q4-{hidden}.gguf", to="gguf", quant="Q4_K_M").output
    return models


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=1024, help="the batching model's hidden size")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--decode", type=int, default=32, help="tokens per request in the batching runs")
    ap.add_argument("--chat-hidden", type=int, default=512, help="the conversation model's hidden size")
    ap.add_argument("--chat-layers", type=int, default=4)
    ap.add_argument("--turns", type=int, default=10)
    ap.add_argument("--words", type=int, default=40, help="words per message")
    ap.add_argument("--reply", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--backend", nargs="+", default=["mlx", "llama.cpp"], choices=["mlx", "llama.cpp"])
    args = ap.parse_args()

    dtype = mx.bfloat16 if mx.default_device() == mx.gpu else mx.float32
    device = f"{mx.default_device()}, {dtype}"
    with tempfile.TemporaryDirectory() as tmp:
        models = build(Path(tmp), args.hidden, args.layers, args.backend)
        size = (models["mlx"] / "model.safetensors").stat().st_size / 1e6
        batching, steps = [], []
        for backend in args.backend:
            llm = mlxqwen.load(models[backend], backend=backend, dtype=dtype, max_context=8192, prefix_cache=False)
            llm.tokenizer.eos_token_ids = set()  # random weights: every request runs its full length
            single = max(aggregate_tps(llm, 1, args.decode) for _ in range(args.repeats))
            for streams in STREAMS:
                tps = single if streams == 1 else max(aggregate_tps(llm, streams, args.decode) for _ in range(2))
                batching.append([backend, streams, tps, f"{tps / single:.2f}"])
            one = step_times(llm, 1, args.repeats)
            for batch in range(1, 9):
                ms = step_times(llm, batch, args.repeats)
                steps.append([backend, batch, ms * 1000, f"{ms / one:.2f}"])
            llm.close()
        print_table(
            f"Aggregate decode, Qwen3.5-shaped 4-bit, {size:.0f} MB, {args.decode} tokens per request ({device})",
            ["backend", "streams", "tok/s", "vs 1 stream"],
            batching,
        )
        print_table("One decode step (runtime alone)", ["backend", "batch", "ms", "vs batch 1"], steps)

        models = build(Path(tmp), args.chat_hidden, args.chat_layers, args.backend)
        size = (models["mlx"] / "model.safetensors").stat().st_size / 1e6
        chats = []
        for backend in args.backend:
            for label, cache in (("mlxqwen, prefix cache", True), ("mlxqwen, no cache", False)):
                llm = mlxqwen.load(models[backend], backend=backend, dtype=dtype, max_context=8192, prefix_cache=cache)
                first, final, read = stateless_ttft(llm, args.turns, args.words, args.reply)
                chats.append([backend, label, first * 1000, final * 1000, f"{final / first:.2f}", read])
                if backend == "mlx" and cache:
                    first, final, read = mlx_lm_stateless_ttft(
                        models["mlx"], llm, args.turns, args.words, args.reply, dtype
                    )
                    row = ["mlx", "mlx-lm, its prompt cache", first * 1000, final * 1000, f"{final / first:.2f}", read]
                llm.close()
            if backend == "mlx":
                chats.append(row)
        print_table(
            f"Time to first token, a {args.turns}-turn conversation sent whole each turn ({args.words}-word "
            f"messages, Qwen3.5-shaped 4-bit, {size:.0f} MB, {device})",
            ["backend", "engine", "turn 1 ms", f"turn {args.turns} ms", "ratio", f"tokens read at turn {args.turns}"],
            chats,
        )
    print_table(
        "Projection (not measured): Qwen3.6-27B 4-bit, 4k context, M4 Max 546 GB/s, bandwidth-bound steps",
        ["streams", "aggregate tok/s", "vs 1 stream"],
        [[n, *projection(n)] for n in STREAMS],
    )


if __name__ == "__main__":
    main()
