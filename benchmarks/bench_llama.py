"""mlxqwen's llama.cpp backend against llama-cpp-python called directly, on the same GGUF, in
the same run.

Models: random weights in a Qwen3-0.6B shape (dense, K/V cache only) and a Qwen3.5 shape
(hybrid: Gated DeltaNet + full attention), the real Qwen tokenizer, written by mlxqwen's
converter as Q4_K_M (a few hundred MB).

1. Decode tokens/s: `llm.stream` (the engine: sampling in MLX, detokenizer, output parser)
   against `Llama.generate` (llama-cpp-python's own sampler chain and eval loop, no text),
   greedy and with Qwen's recommended sampling; same prompt tokens, threads, flash
   attention and F16 K/V cache. Tokens/s is 1 / the median time between two tokens over
   alternated runs, which other processes on a shared machine disturb least. The overhead
   is how much slower mlxqwen decodes.
2. A chat, turn by turn: the prompt tokens llama.cpp evaluates (its own count) for each turn
   with a `ChatSession` against `Llama.create_chat_completion` on the whole history (which
   reuses the common prefix of a K/V cache, but cannot cut a recurrent state back).

    python benchmarks/bench_llama.py [--arch qwen3 qwen3_5] [--decode 128] [--repeats 6] [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import llama_cpp
import numpy as np
from common import print_table, qwen3_5_config, write_checkpoint
from mlxqwen.convert import convert

import mlxqwen
from mlxqwen.backends.llama_cpp import default_threads, model_params

# llama-cpp-python's `Llama` loads with the same model parameters as the backend (see `model_params`)
llama_cpp.llama_cpp.llama_model_default_params = model_params

TOKENIZER = Path(__file__).parent.parent / "tests" / "fixtures" / "qwen3-tokenizer"
WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex the jovial bumpkin".split()
SAMPLINGS = {"greedy": dict(temperature=0.0), "t=0.6 top-p 0.95 top-k 20": dict(temperature=0.6, top_p=0.95, top_k=20)}


def qwen3_config() -> dict:
    """Qwen3-0.6B's shape."""
    return {
        "model_type": "qwen3",
        "vocab_size": 151936,
        "hidden_size": 1024,
        "intermediate_size": 3072,
        "num_hidden_layers": 28,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1e6,
        "max_position_embeddings": 40960,
        "tie_word_embeddings": True,
    }


def qwen35_config() -> dict:
    config = qwen3_5_config(hidden=1024, layers=12)
    config["text_config"]["tie_word_embeddings"] = True
    return config


CONFIGS = {"qwen3": qwen3_config, "qwen3_5": qwen35_config}


def build_gguf(arch: str, workdir: Path) -> Path:
    out = workdir / f"{arch}-Q4_K_M.gguf"
    if out.exists():
        return out
    src = write_checkpoint(workdir / f"{arch}-mlx", CONFIGS[arch]())
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(TOKENIZER / name, src / name)
    convert(src, out, to="gguf", quant="Q4_K_M")
    shutil.rmtree(src)
    return out


def user_message(turn: int, words: int) -> str:
    return " ".join(WORDS[(turn * 7 + i) % len(WORDS)] for i in range(words)) + "?"


def direct_llama(gguf: Path, n_ctx: int) -> llama_cpp.Llama:
    """llama-cpp-python on the settings the backend gives llama.cpp."""
    threads = default_threads()
    return llama_cpp.Llama(
        str(gguf),
        n_ctx=n_ctx,
        n_batch=512,
        n_ubatch=512,
        n_threads=threads,
        n_threads_batch=threads,
        flash_attn=True,  # the backend leaves it to llama.cpp ("auto"), which turns it on for these models
        verbose=False,
    )


def direct_decode(llm: llama_cpp.Llama, prompt: list[int], n: int, sampling: dict) -> list[float]:
    """Seconds between successive tokens of llama-cpp-python's own loop."""
    llm.reset()
    tokens = llm.generate(
        prompt,
        temp=sampling["temperature"],
        top_k=sampling.get("top_k", 0),
        top_p=sampling.get("top_p", 1.0),
        min_p=0.0,
        repeat_penalty=1.0,
    )
    stamps = []
    for _ in tokens:
        stamps.append(time.perf_counter())
        if len(stamps) == n:
            break
    return list(np.diff(stamps))


def engine_decode(llm, prompt: str, n: int, sampling: dict) -> list[float]:
    """Seconds between successive tokens of `llm.stream` (each token is one `decode` call)."""
    stamps = []
    decode = llm.runtime.decode

    def timed(seqs, tokens):
        stamps.append(time.perf_counter())
        return decode(seqs, tokens)

    llm.runtime.decode = timed
    try:
        mlxqwen.llm.last(llm.stream(prompt, raw=True, max_tokens=n, **sampling))
    finally:
        del llm.runtime.decode
    return list(np.diff(stamps[1:]))  # the first decode follows the prompt


def decode_rows(arch: str, gguf: Path, args: argparse.Namespace) -> list[list]:
    llm = mlxqwen.load(gguf, backend="llama.cpp", max_context=2048)
    direct = direct_llama(gguf, 2048)
    prompt = llm.prompt_text(user_message(0, 60), think=False)
    tokens = llm.tokenizer.encode(prompt)
    rows = []
    for label, sampling in SAMPLINGS.items():
        ours, theirs = [], []
        for repeat in range(args.repeats):  # alternated: other work on the machine slows both alike
            if repeat % 2:
                ours += engine_decode(llm, prompt, args.decode, sampling)
            theirs += direct_decode(direct, tokens, args.decode, sampling)
            if not repeat % 2:
                ours += engine_decode(llm, prompt, args.decode, sampling)
        # the median time per token: what a run does when other processes leave it alone
        base, mine = 1 / np.median(theirs), 1 / np.median(ours)
        rows.append([arch, label, len(tokens), f"{len(theirs)}/{len(ours)}", base, mine, 100 * (1 - mine / base)])
    direct.close()
    llm.close()
    return rows


def evaluated(ctx) -> tuple[int, int]:
    """llama.cpp's own counts of tokens evaluated in batches (prompts) and one at a time."""
    perf = llama_cpp.llama_perf_context(ctx)
    return perf.n_p_eval, perf.n_eval


def chat_rows(arch: str, gguf: Path, args: argparse.Namespace) -> list[list]:
    llm = mlxqwen.load(gguf, backend="llama.cpp", max_context=8192)
    direct = direct_llama(gguf, 8192)
    llm.generate("warm up the counters", raw=True, max_tokens=2)  # llama.cpp reports 0 as 1
    direct.create_completion("warm up the counters", max_tokens=2)
    chat = llm.chat(temperature=0, max_tokens=args.reply)
    history: list[dict] = []
    rows = []
    for turn in range(args.turns):
        message = user_message(turn, 40)
        batched, single = evaluated(llm.runtime.ctx)
        done = chat.send(message)
        after = evaluated(llm.runtime.ctx)
        ours = after[0] - batched + after[1] - single - done.stats.generated_tokens  # each reply token is fed too
        history.append({"role": "user", "content": message})
        batched, _ = evaluated(direct._ctx.ctx)
        start = time.perf_counter()
        first = None
        reply = []
        for chunk in direct.create_chat_completion(history, max_tokens=args.reply, temperature=0.0, stream=True):
            first = first or time.perf_counter()
            reply.append(chunk["choices"][0]["delta"].get("content") or "")
        theirs = evaluated(direct._ctx.ctx)[0] - batched  # its prompt goes in batches, each reply token alone
        history.append({"role": "assistant", "content": "".join(reply)})
        rows.append([arch, turn + 1, chat.tokens, ours, done.stats.ttft, theirs, first - start])
    direct.close()
    llm.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--decode", type=int, default=128, help="tokens to decode per run")
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--turns", type=int, default=5, help="chat turns")
    parser.add_argument("--reply", type=int, default=16, help="tokens per chat reply")
    parser.add_argument("--keep", type=Path, help="build the GGUFs here and reuse them (default: a temporary folder)")
    args = parser.parse_args()
    workdir = args.keep or Path(tempfile.mkdtemp(prefix="bench-llama-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        ggufs = {arch: build_gguf(arch, workdir) for arch in args.arch}
        sizes = ", ".join(f"{a} {p.stat().st_size / 1e6:.0f} MB" for a, p in ggufs.items())
        decode = [row for arch, gguf in ggufs.items() for row in decode_rows(arch, gguf, args)]
        print_table(
            f"Decode tok/s (1 / median time per token), Q4_K_M ({sizes}), {os.cpu_count()} cores",
            ["model", "sampling", "prompt", "tokens timed", "llama-cpp-python", "mlxqwen", "overhead %"],
            decode,
        )
        chats = [row for arch, gguf in ggufs.items() for row in chat_rows(arch, gguf, args)]
        print_table(
            f"Chat turns: prompt tokens llama.cpp evaluates per turn ({args.reply}-token replies)",
            ["model", "turn", "context", "mlxqwen", "TTFT s", "llama-cpp-python", "TTFT s"],
            chats,
        )
    finally:
        if args.keep is None:
            shutil.rmtree(workdir)


if __name__ == "__main__":
    main()
