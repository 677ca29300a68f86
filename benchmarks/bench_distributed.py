"""One model split across processes on this host with MLX's ring backend (`mlx.launch -n N`), against
what `mlxqwen fit --hosts` plans: each rank's weights and peak memory, the bytes each rank sends per
token decoded (measured on its TCP sockets with `ss`), and decode tok/s at 1, 2 and 4 ranks.

The model is Qwen3.5-shaped (Gated DeltaNet + gated attention, random 4-bit weights in mlx-lm's
format). Rank 0 reads a prompt, then decodes greedily one token at a time through the runtime
(what the engine calls), every step evaluated before the next. On one host every rank shares the
same cores, so more ranks are slower here; the last table projects two Macs over Thunderbolt from the
bytes per token measured here and a link's bandwidth and latency (a projection, not a measurement).

    python benchmarks/bench_distributed.py [--hidden 2048 --layers 4 --vocab 32768 --tokens 16]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
from common import print_table, qwen3_5_config, write_checkpoint

from mlxqwen import distributed, memory
from mlxqwen.backends import mlx

TOKENIZER = Path(__file__).parent.parent / "tests" / "fixtures" / "qwen3-tokenizer"
RUNS = [(1, "pipeline"), (2, "pipeline"), (2, "tensor"), (4, "pipeline"), (4, "tensor")]
MiB = 2**20


def bytes_sent(pid: int) -> int:
    """What the process has sent on its TCP sockets (the ring's), from the kernel's counters."""
    out = subprocess.run(["ss", "-tinpH"], capture_output=True, text=True, check=True).stdout
    blocks = re.split(r"\n(?=\S)", out)
    return sum(int(m.group(1)) for b in blocks if f"pid={pid}," in b and (m := re.search(r"bytes_sent:(\d+)", b)))


def worker(model: Path, parallel: str, out: Path, tokens: int) -> None:
    rank = distributed.rank()
    (out / f"{rank}.pid").write_text(str(os.getpid()))
    runtime = mlx.load(model, parallel=parallel)
    result = {"weights": memory.weight_bytes(runtime.model)}
    if rank > 0:
        runtime.follow()
    else:
        size = distributed.group().size() if distributed.group() else 1
        pids = [int((out / f"{r}.pid").read_text()) for r in range(size)]
        seq = runtime.new_sequence()
        runtime.prefill(seq, list(range(100, 108)))
        token = mx.array([7])
        for _ in range(3):  # warm up (compiled steps)
            token = mx.argmax(runtime.decode([seq], token), axis=-1)
        before = [bytes_sent(p) for p in pids]
        start = time.perf_counter()
        for _ in range(tokens):
            token = mx.argmax(runtime.decode([seq], token), axis=-1)
        mx.eval(token)
        result["tok_s"] = tokens / (time.perf_counter() - start)
        result["sent"] = [(bytes_sent(p) - b) / tokens for p, b in zip(pids, before, strict=True)]
        if isinstance(runtime, mlx.DistributedRuntime):
            runtime.close()
    result["peak"] = mx.get_peak_memory()
    (out / f"{rank}.json").write_text(json.dumps(result))


def launch(model: Path, ranks: int, parallel: str, out: Path, tokens: int) -> list[dict]:
    me = [__file__, "--worker", str(model), parallel, str(out), str(tokens)]
    if ranks == 1:
        argv = [sys.executable, *me]
    else:
        launcher = str(Path(sys.executable).parent / "mlx.launch")
        argv = [launcher, "-n", str(ranks), "--backend", "ring", "--python", sys.executable, "--", *me]
    # a loaded shared host is slow: the watchdog waits longer than it would between Macs
    subprocess.run(argv, check=True, timeout=1800, env={**os.environ, distributed.TIMEOUT_ENV: "900"})
    return [json.loads((out / f"{r}.json").read_text()) for r in range(ranks)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--bandwidth", type=float, default=4.0, help="link GB/s for the projection")
    parser.add_argument("--latency", type=float, default=50.0, help="link latency per message in µs")
    parser.add_argument("--mac-tok-s", type=float, default=26.0, help="one Mac's decode tok/s for the projection")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model = write_checkpoint(Path(tmp) / "model", qwen3_5_config(args.hidden, args.layers, args.vocab))
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (model / name).write_bytes((TOKENIZER / name).read_bytes())
        rows, speed, sent_2 = [], [], {}
        for ranks, parallel in RUNS:
            out = Path(tmp) / f"{ranks}-{parallel}"
            out.mkdir()
            results = launch(model, ranks, parallel, out, args.tokens)
            hosts = [f"rank {r}" for r in range(ranks)]
            planned = mlx.split_sizing(model, hosts, [1] * ranks, parallel) if ranks > 1 else []
            for r, res in enumerate(results):
                part = planned[r][0] if planned else None
                rows.append([
                    f"{ranks} × {parallel}" if ranks > 1 else "1 (whole model)", r,
                    f"{res['weights'] / MiB:.1f}", f"{part.weights / MiB:.1f}" if part else "-",
                    f"{res['peak'] / MiB:.1f}",
                    f"{results[0]['sent'][r]:,.0f}", f"{part.sent:,}" if part else "-",
                ])  # fmt: skip
            speed.append([f"{ranks} × {parallel}" if ranks > 1 else "1", f"{results[0]['tok_s']:.2f}"])
            if ranks == 2:
                sent_2[parallel] = results[0]["sent"]
    print_table(
        f"Per rank, Qwen3.5-shaped 4-bit model (hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}), "
        f"fp32 compute, {args.tokens} tokens",
        ["ranks", "rank", "weights MiB", "planned MiB", "peak MiB", "sent B/token", "planned B/token"],
        rows,
    )
    print_table(f"Decode tok/s on this host ({os.cpu_count()} cores shared by all ranks)", ["ranks", "tok/s"], speed)
    project(args, sent_2)


def project(args: argparse.Namespace, sent: dict[str, list[float]]) -> None:
    """Two Macs over Thunderbolt, for Qwen3.6-27B (hidden 5120, 64 layers, vocab 248,320, bf16
    activations), from the bytes per token measured here scaled to its sizes. Per token: one Mac's time
    (pipeline: each Mac reads half the weights, one after the other, so as one Mac; tensor: both read
    half at once, so half of it), plus each message's latency (rank 0's call: two sums of two steps;
    pipeline: the hidden state there, the logits back; tensor: two sums of two steps per layer) and
    the bytes over the bandwidth."""
    hidden = 5120 * 2 / (args.hidden * 4)
    vocab = 248320 * 2 / (args.vocab * 4)
    layers = 64 / args.layers
    one = 1 / args.mac_tok_s
    cases = {
        "pipeline": (sent["pipeline"][0] * hidden + sent["pipeline"][1] * vocab, 4 + 2, one),
        "tensor": (sent["tensor"][0] * hidden * layers, 4 + 2 * 64 * 2, one / 2),
    }
    rows = []
    for parallel, (per_token, messages, compute) in cases.items():
        link = messages * args.latency * 1e-6 + per_token / (args.bandwidth * 1e9)
        rows.append([parallel, f"{per_token:,.0f}", messages, f"{1 / (compute + link):.1f}"])
    print_table(
        f"PROJECTION (not measured): Qwen3.6-27B 4-bit on 2 Macs over Thunderbolt ({args.bandwidth:g} GB/s, "
        f"{args.latency:g} µs a message; one Mac alone: {args.mac_tok_s:g} tok/s, given)",
        ["parallel", "bytes/token (scaled from measured)", "messages/token", "projected tok/s"],
        rows,
    )


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(Path(sys.argv[2]), sys.argv[3], Path(sys.argv[4]), int(sys.argv[5]))
    else:
        main()
