"""Speculative decoding with the model's MTP head, in one run.

On the demo model (its trained head) and on a Qwen3.5-shaped 4-bit model with random weights
and a random head (its guesses are almost never kept: the case where the head must not cost),
MLX and llama.cpp (the same weights as GGUF Q4_K_M, written with the head):
1. The time of one forward pass of the model over T = 1..4 tokens of a sequence (`verify`, the
   pass that checks T - 1 guesses), and of the head's guesses (`draft`) at depth 1..3.
2. Acceptance by depth, greedy, through the runtime alone on the demo's questions: the head
   guesses 3 tokens, the model reads the next token and them in one pass, the guesses equal to
   its own argmax are kept up to the first that is not; the share kept at each guess position
   (given the ones before it were) and the tokens each pass gives.
3. Decode tokens/s at temperature 0 through the engine (`llm.stream`, sampling and detokenizing
   included), without the head and with it at depth 1, 2, 3 and chosen as it pays: generated
   tokens over decoding time, all questions, rounds alternated, the median round.

4. A projection for Apple Silicon from the demo's acceptance: the time of a pass over T tokens
   and of the head's guesses computed from Qwen3.6-27B's bytes and flops, not measured.

Plain MLX decoding against mlx-lm is `bench_decode.py`'s.

    python benchmarks/bench_mtp.py [--rounds 5] [--max-tokens 160] [--backend mlx llama.cpp] [--models demo random]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from math import prod
from pathlib import Path

import mlx.core as mx
from common import print_table, qwen3_5_config, write_checkpoint

import mlxqwen
from mlxqwen.backends.runtime import Runtime
from mlxqwen.demo import model_path
from mlxqwen.llm import LLM, last

QUESTIONS = [
    "What is 37 + 48?",
    "What is 84 - 29?",
    "What is 6 times 73?",
    "What is the capital of Peru?",
    "Convert 7 km to m.",
    "What is the chemical symbol of iron?",
]
WIDTHS = (1, 2, 3, 4)
TOKENIZER = Path(__file__).parent.parent / "tests" / "fixtures" / "qwen3-tokenizer"


def greedy(logits: mx.array) -> mx.array:
    return mx.argmax(logits, axis=-1)


def prompt_tokens(llm: LLM, question: str) -> list[int]:
    return llm.tokenizer.encode(llm.prompt_text(question))


def pass_seconds(runtime: Runtime, prompt: list[int], repeats: int) -> tuple[dict[int, float], dict[int, float]]:
    """Median seconds of a forward pass over T tokens (a verify, then one kept) and of the head's
    guesses at each depth, on one sequence that holds `prompt`."""
    seq = runtime.new_sequence()
    runtime.prefill(seq, prompt)
    forward: dict[int, list[float]] = {t: [] for t in WIDTHS}
    draft: dict[int, list[float]] = {d: [] for d in WIDTHS[:-1]}
    token = prompt[-1]
    for _ in range(repeats):
        for t in WIDTHS:
            start = time.perf_counter()
            mx.eval(runtime.verify([seq], mx.array([[token] * t])))
            forward[t].append(time.perf_counter() - start)
            runtime.commit([seq], [1])
            if runtime.mtp and t < WIDTHS[-1]:
                start = time.perf_counter()
                mx.eval(runtime.draft([seq], mx.array([token]), t, greedy))
                draft[t].append(time.perf_counter() - start)
    runtime.release(seq)
    medians = {t: statistics.median(s) for t, s in forward.items()}
    return medians, {d: statistics.median(s) for d, s in draft.items() if s}


def acceptance(runtime: Runtime, prompts: list[list[int]], depth: int, max_tokens: int) -> tuple[list[float], float]:
    """Greedy speculative decoding through the runtime alone: the share of guesses kept at each
    position (given the ones before it were), and the tokens a verify pass gives."""
    kept, tried, passes, made = [0] * depth, [0] * depth, 0, 0
    stop = runtime.tokenizer.eos_token_ids
    for prompt in prompts:
        seq = runtime.new_sequence()
        runtime.prefill(seq, prompt[:-1])
        following, count = int(greedy(runtime.decode([seq], mx.array(prompt[-1:])))[0]), 1
        while count < max_tokens and following not in stop:
            guesses = runtime.draft([seq], mx.array([following]), depth, greedy)[0].tolist()
            model = greedy(runtime.verify([seq], mx.array([[following, *guesses]]))[0]).tolist()
            n = next((j for j in range(depth) if guesses[j] != model[j]), depth)
            for j in range(min(n + 1, depth)):
                tried[j] += 1
                kept[j] += j < n
            runtime.commit([seq], [n + 1])
            following, count, passes, made = model[n], count + n + 1, passes + 1, made + n + 1
        runtime.release(seq)
    return [k / t if t else 0.0 for k, t in zip(kept, tried, strict=True)], made / passes


def decode_tps(llm: LLM, questions: list[str], max_tokens: int) -> tuple[float, int, int]:
    """Generated tokens over decoding seconds for all `questions` (greedy), with the head's guesses
    and how many were kept."""
    tokens = seconds = drafted = accepted = 0
    for question in questions:
        stats = last(llm.stream(question, temperature=0, max_tokens=max_tokens)).stats
        if stats.generated_tokens < 2:  # no decoding time
            continue
        tokens += stats.generated_tokens - 1
        seconds += (stats.generated_tokens - 1) / stats.generation_tps
        drafted, accepted = drafted + stats.draft_tokens, accepted + stats.accepted_tokens
    return tokens / seconds, drafted, accepted


def model_rows(label: str, path: Path, backend: str, rounds: int, max_tokens: int) -> list[float]:
    """The three tables for one model on one runtime; the acceptance rates by guess position."""
    plain = mlxqwen.load(path, backend=backend, mtp=False, prefix_cache=False)
    configs = {"no head": plain}
    for depth in (1, 2, 3, None):
        llm = mlxqwen.load(path, backend=backend, mtp=True, mtp_depth=depth, prefix_cache=False)
        configs[f"head, depth {depth}" if depth else "head, depth as it pays"] = llm
    runtime = configs["head, depth 3"].runtime
    prompts = [prompt_tokens(plain, q) for q in QUESTIONS]

    forward, draft = pass_seconds(runtime, prompts[0], repeats=20 * rounds)
    print_table(
        f"{label}: forward pass",
        ["T tokens", "ms", "× T=1", "head's guesses at depth T (ms)"],
        [[t, forward[t] * 1e3, forward[t] / forward[1], draft[t] * 1e3 if t in draft else "-"] for t in WIDTHS],
    )

    rates, per_pass = acceptance(runtime, prompts, 3, max_tokens)
    print_table(
        f"{label}: acceptance, greedy, depth 3 (runtime alone)",
        ["guess", "kept (given the ones before)"],
        [[j + 1, rate] for j, rate in enumerate(rates)] + [["tokens per verify pass", per_pass]],
    )

    results: dict[str, list[tuple[float, int, int]]] = {name: [] for name in configs}
    for _ in range(rounds):
        for name, llm in configs.items():
            results[name].append(decode_tps(llm, QUESTIONS, max_tokens))
    base = statistics.median(r[0] for r in results["no head"])
    rows = []
    for name, runs in results.items():
        tps = statistics.median(r[0] for r in runs)
        drafted, accepted = sum(r[1] for r in runs), sum(r[2] for r in runs)
        steps = "-" if not drafted else f"{accepted / drafted:.2f}"
        rows.append([name, tps, tps / base, steps])
    print_table(
        f"{label}: decode, temperature 0, engine (median of {rounds} rounds of {len(QUESTIONS)} questions)",
        ["", "tokens/s", "× no head", "guesses kept"],
        rows,
    )
    for llm in configs.values():
        llm.close()
    return rates


# Qwen3.6-27B at 4 bits (4.5 bits a weight with the scales) on an M4 Max, from its dimensions:
# a pass over T tokens reads the weights once and computes 2 flops a weight a token, not overlapped
_WEIGHTS, _PARAMS = 15.5e9, 26.9e9
_HEAD_PARAMS = 0.372e9 + 0.052e9 + 1.271e9  # one decoder layer, the fc, the lm_head it shares
_BANDWIDTH, _FLOPS = 546e9, 18e12


def _pass_seconds(tokens: int) -> float:
    return _WEIGHTS / _BANDWIDTH + 2 * _PARAMS * tokens / _FLOPS


def projection(rates: list[float]) -> None:
    """Projected decode speedup on Apple Silicon from the demo's acceptance: tokens a verify pass
    gives over the time of that pass and of the head's guesses, relative to plain decoding."""
    head = _HEAD_PARAMS * 4.5 / 8 / _BANDWIDTH + 2 * _HEAD_PARAMS / _FLOPS
    rows = []
    for depth in (1, 2, 3):
        tokens = 1 + sum(prod(rates[: j + 1]) for j in range(depth))
        cost = (_pass_seconds(depth + 1) + depth * head) / _pass_seconds(1)
        rows.append([depth, tokens, cost, tokens / cost])
    print_table(
        "PROJECTION, not measured: Qwen3.6-27B 4-bit on an M4 Max (546 GB/s, 18 TFLOPS), the demo's acceptance",
        ["depth", "tokens per pass", "pass + guesses (× plain step)", "projected speedup"],
        rows,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=160)
    parser.add_argument("--hidden", type=int, default=1024, help="the Qwen3.5-shaped model's hidden size")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--backend", nargs="+", default=["mlx", "llama.cpp"], choices=["mlx", "llama.cpp"])
    parser.add_argument("--models", nargs="+", default=["demo", "random"], choices=["demo", "random"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if "demo" in args.models:
            for backend in args.backend:
                path = model_path("mlx" if backend == "mlx" else "gguf")  # the shipped GGUF carries the head
                rates = model_rows(f"demo, {backend}", path, backend, args.rounds, args.max_tokens)
            projection(rates)
        if "random" in args.models:
            config = qwen3_5_config(args.hidden, args.layers)
            checkpoint = write_checkpoint(tmp / "q4", config, mtp=True)
            for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
                shutil.copy(TOKENIZER / name, checkpoint / name)
            for backend in args.backend:
                path = checkpoint if backend == "mlx" else gguf_with_head(checkpoint, tmp / "q4-Q4_K_M.gguf")
                shape = f"Qwen3.5-shaped 4-bit, hidden {args.hidden}, {args.layers} layers, random head, {backend}"
                model_rows(shape, path, backend, args.rounds, args.max_tokens)


def gguf_with_head(source: Path, out: Path) -> Path:
    from mlxqwen.convert import convert

    return convert(source, out, to="gguf", quant="Q4_K_M").output


if __name__ == "__main__":
    main()
