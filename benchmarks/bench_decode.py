"""Plain decode speed (no MTP) of mlxqwen against mlx-lm at equal dtype, in the same run.

Models built from random weights in mlx-lm's format: a Qwen3.5-shaped one (Gated DeltaNet +
gated attention) and a Qwen3 one, each unquantized (bf16) and 4-bit (group 64, bf16 scales as
mlx-lm writes them). Both engines decode greedily from the same prompt tokens with EOS off:
`mlxqwen` through `llm.stream` (its engine, sampler and detokenizer), mlx-lm through
`mlx_lm.stream_generate`, each computing in `--compute` (mlx-lm's weights cast to it as ours
are). Runs alternate between the two; decode tok/s is one over the median time between
consecutive tokens of all runs (mlx-lm: as its generator yields them; mlxqwen: between the
engine's decode steps), which a shared machine's bursts of load move least.

    python benchmarks/bench_decode.py [--hidden 1024 --layers 8 --decode 32 --repeats 5]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import mlx.core as mx
from common import print_table, qwen3_5_config, qwen3_config, write_checkpoint
from mlx.utils import tree_map

import mlxqwen

TOKENIZER = Path(__file__).parent.parent / "tests" / "fixtures" / "qwen3-tokenizer"
PROMPT = "the cat sat on the mat and the dog ran to the big red house by the sea " * 2  # token ids < 16k


def mlx_lm_intervals(model, tokenizer, prompt: list[int], tokens: int) -> list[float]:
    from mlx_lm import stream_generate

    stamps = [time.perf_counter() for _ in stream_generate(model, tokenizer, prompt, max_tokens=tokens)]
    return [b - a for a, b in zip(stamps, stamps[1:], strict=False)]


def mlxqwen_intervals(llm, tokens: int) -> list[float]:
    runtime, stamps = llm.runtime, []
    decode = runtime.decode

    def timed(seqs, inputs):
        stamps.append(time.perf_counter())
        return decode(seqs, inputs)

    runtime.decode = timed
    try:
        mlxqwen.llm.last(llm.stream(PROMPT, raw=True, temperature=0, max_tokens=tokens))
    finally:
        del runtime.decode
    return [b - a for a, b in zip(stamps, stamps[1:], strict=False)]


def measure(path: Path, compute: mx.Dtype, tokens: int, repeats: int) -> tuple[float, float]:
    """Decode tok/s of (mlx-lm, mlxqwen) on the checkpoint at `path`."""
    from mlx_lm.tokenizer_utils import load as load_tokenizer
    from mlx_lm.utils import load_model

    theirs, _ = load_model(path)
    floating = (mx.bfloat16, mx.float16, mx.float32)
    theirs.update(tree_map(lambda x: x.astype(compute) if x.dtype in floating else x, theirs.parameters()))
    their_tokenizer = load_tokenizer(path)
    their_tokenizer.eos_token_ids = set()  # random weights: every run decodes its full length
    llm = mlxqwen.load(path, dtype=compute, backend="mlx", max_context=4096, prefix_cache=False)
    llm.tokenizer.eos_token_ids = set()
    prompt = llm.tokenizer.encode(PROMPT)
    if max(prompt) >= llm.config.vocab_size:
        raise SystemExit(f"--vocab {llm.config.vocab_size} is smaller than the prompt's token ids")
    mlx_lm_intervals(theirs, their_tokenizer, prompt, 4)  # warm-up
    mlxqwen_intervals(llm, 4)
    ref, got = [], []
    for _ in range(repeats):
        ref += mlx_lm_intervals(theirs, their_tokenizer, prompt, tokens)
        got += mlxqwen_intervals(llm, tokens)
    llm.close()
    return 1 / statistics.median(ref), 1 / statistics.median(got)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--decode", type=int, default=32, help="tokens per run")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument(
        "--compute",
        default=None,
        help="compute dtype of every run (default: bfloat16 for bf16 weights; for 4-bit, bfloat16 on a GPU "
        "and float32 on a CPU, where MLX's bf16 quantized kernels are several times slower)",
    )
    ap.add_argument("--models", default="qwen3_5,qwen3")
    ap.add_argument("--weights", default="bf16,4bit")
    args = ap.parse_args()

    configs = {"qwen3_5": qwen3_5_config, "qwen3": qwen3_config}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            for weights in args.weights.split(","):
                bits = 4 if weights == "4bit" else None
                config = configs[name](args.hidden, args.layers, args.vocab)
                path = write_checkpoint(Path(tmp) / f"{name}-{weights}", config, bits=bits)
                for file in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
                    shutil.copy(TOKENIZER / file, path / file)
                size = (path / "model.safetensors").stat().st_size / 1e6
                compute = (
                    getattr(mx, args.compute)
                    if args.compute
                    else mx.bfloat16
                    if bits is None
                    else mlxqwen.loader.default_dtype()
                )
                ref, got = measure(path, compute, args.decode, args.repeats)
                rows.append(
                    [f"{name} {weights}", f"{size:.0f}", str(compute).split(".")[-1], ref, got, f"{got / ref:.2f}"]
                )
                shutil.rmtree(path)
    print_table(
        f"Plain decode, hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, {args.decode} tokens, "
        f"{mx.default_device()}, {args.repeats} runs each",
        ["model", "MB", "compute", "mlx-lm tok/s", "mlxqwen tok/s", "ratio"],
        rows,
    )


if __name__ == "__main__":
    main()
