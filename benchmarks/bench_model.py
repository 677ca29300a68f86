"""Prefill and decode speed of mlxqwen's model against mlx-lm's implementation, on the same
4-bit Qwen3.5-shaped weights (random), in the same run.

    python benchmarks/bench_model.py [--hidden 1024 --layers 8 --prompt 128 --decode 16]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import mlx.core as mx
from common import print_table, qwen3_5_config, write_checkpoint
from mlx.utils import tree_map

from mlxqwen.loader import load_model


def measure(model, make_cache, prompt: mx.array, decode: int) -> tuple[float, float]:
    """Tokens/s of one prefill of `prompt` and of `decode` greedy steps after it.

    Prefill evaluates only the cache for all but the last prompt token, as a generation
    loop does: logits (and the lm_head matmul) are needed for the last position only."""
    warm = make_cache()
    mx.eval(model(prompt[:, :8], cache=warm))
    cache = make_cache()
    start = time.perf_counter()
    model(prompt[:, :-1], cache=cache)
    mx.eval([c.state for c in cache])
    token = mx.argmax(model(prompt[:, -1:], cache=cache)[:, -1], axis=-1)
    mx.eval(token)
    prefill = prompt.shape[1] / (time.perf_counter() - start)
    start = time.perf_counter()
    for _ in range(decode):
        token = mx.argmax(model(token[:, None], cache=cache)[:, -1], axis=-1)
        mx.async_eval(token)
    mx.eval(token)
    return prefill, decode / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--decode", type=int, default=16)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    args = ap.parse_args()

    from mlx_lm.utils import load_model as mlx_lm_load_model

    with tempfile.TemporaryDirectory() as tmp:
        path = write_checkpoint(Path(tmp) / "q4", qwen3_5_config(args.hidden, args.layers))
        size_mb = (path / "model.safetensors").stat().st_size / 1e6
        prompt = mx.random.randint(0, 151936, (1, args.prompt))
        rows = []
        for name in args.dtypes.split(","):
            dtype = getattr(mx, name)
            theirs, _ = mlx_lm_load_model(path)
            theirs.update(
                tree_map(lambda x, d=dtype: x.astype(d) if x.dtype == mx.bfloat16 else x, theirs.parameters())
            )
            ours, _ = load_model(path, dtype=dtype)
            ref = measure(theirs, theirs.make_cache, prompt, args.decode)
            got = measure(ours, ours.make_cache, prompt, args.decode)
            rows.append([f"mlx-lm ({name})", ref[0], ref[1], "1.00", "1.00"])
            rows.append([f"mlxqwen ({name})", got[0], got[1], f"{got[0] / ref[0]:.2f}", f"{got[1] / ref[1]:.2f}"])
        print_table(
            f"Qwen3.5-shaped 4-bit model, {size_mb:.0f} MB, {args.layers} layers, hidden {args.hidden}, "
            f"prompt {args.prompt}, {mx.default_device()}",
            ["implementation", "prefill tok/s", "decode tok/s", "prefill ratio", "decode ratio"],
            rows,
        )


if __name__ == "__main__":
    main()
