"""`mlxqwen serve` against `mlx_lm.server` (same MLX model) and llama-cpp-python's server (same
GGUF, where `llama-cpp-python[server]` is installed), in the same run, over their common
OpenAI API (/v1/chat/completions, streamed).

1. Concurrency: 1, 4 and 8 clients each send `--requests` chat requests at once (greedy,
   at most `--max-tokens` tokens); aggregate tokens/s (every client's streamed tokens over
   the wall time) and the time to the first token, median and 95th percentile.
2. A stateless chat: one client resends the whole conversation each turn (as every HTTP
   client does); the time to the first token of turn 1 and of the last turn.

Each server runs as its own process on a free loopback port and is stopped after its turn.
Models: for MLX a 4-bit Qwen3.5-shaped checkpoint with random weights and the real Qwen
tokenizer (mlx-lm cannot load the demo model, whose MTP head it does not know), so every reply
runs to `--max-tokens`; for llama.cpp the demo model's Q4_K_M GGUF. Or `--mlx DIR` / `--gguf FILE`.

    python benchmarks/bench_serve.py [--backends mlx llama.cpp] [--clients 1 4 8] [--requests 2] [--turns 10]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
from common import QUESTIONS, print_table, qwen3_5_config, write_checkpoint

from mlxqwen import demo

TOKENIZER = Path(__file__).parents[1] / "tests" / "fixtures" / "qwen3-tokenizer"

# llama-cpp-python's server, run with mlxqwen's llama.cpp model parameters (see tests/conftest.py)
_LLAMA_SERVER = (
    "import sys, llama_cpp.llama_cpp as l; from mlxqwen.backends.llama_cpp import model_params; "
    "l.llama_model_default_params = model_params; from llama_cpp.server.__main__ import main; "
    "sys.argv[0] = 'llama_cpp.server'; main()"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(command: list[str], log: Path) -> Iterator[tuple[str, str]]:
    """The server's URL and the model it serves: the first of /v1/models, or mlx_lm.server's
    name for the model it was started with (its /v1/models lists the Hugging Face cache)."""
    port = free_port()
    with open(log, "w") as out:
        process = subprocess.Popen([c.format(port=port) for c in command], stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                models = httpx.get(f"{url}/v1/models", timeout=2)
                if models.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{command[:4]} did not start: {log.read_text()[-1500:]}")
            time.sleep(0.3)
        listed = models.json()["data"] if models.content else []
        yield url, listed[0]["id"] if listed else "default_model"
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()


def chat(url: str, model: str, messages: list[dict], max_tokens: int) -> tuple[float, int, str]:
    """One streamed request: (seconds to the first token, tokens streamed, text)."""
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    start, first, tokens, text = time.perf_counter(), None, 0, []
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choices = json.loads(line[6:]).get("choices") or [{}]
            delta = choices[0].get("delta") or {}
            piece = (delta.get("content") or "") + (delta.get("reasoning_content") or delta.get("reasoning") or "")
            if piece:
                first = first or time.perf_counter()
                tokens += 1  # each server streams one token per chunk
                text.append(delta.get("content") or "")
    return (first or time.perf_counter()) - start, tokens, "".join(text)


def concurrency(url: str, model: str, clients: int, requests: int, max_tokens: int) -> tuple[float, float, float, int]:
    """(aggregate tokens/s, median TTFT, 95th percentile TTFT, failed requests)."""
    ttfts: list[float] = []
    total = failed = 0
    lock = threading.Lock()

    def client(i: int) -> None:
        nonlocal total, failed
        for j in range(requests):
            q = QUESTIONS[(i + j) % len(QUESTIONS)]
            try:
                ttft, tokens, _ = chat(url, model, [{"role": "user", "content": q}], max_tokens)
            except httpx.HTTPError:
                with lock:
                    failed += 1
                continue
            with lock:
                ttfts.append(ttft)
                total += tokens

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ttfts.sort()
    return total / wall, statistics.median(ttfts), ttfts[min(len(ttfts) - 1, int(0.95 * len(ttfts)))], failed


def stateless_chat(url: str, model: str, turns: int, max_tokens: int) -> tuple[float, float]:
    """TTFT of the first and the last turn of a chat resent whole every turn."""
    messages: list[dict] = []
    ttfts = []
    for turn in range(turns):
        messages.append({"role": "user", "content": QUESTIONS[turn % len(QUESTIONS)]})
        ttft, _, text = chat(url, model, messages, max_tokens)
        ttfts.append(ttft)
        messages.append({"role": "assistant", "content": text})
    return ttfts[0], ttfts[-1]


def servers(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """(label, command) of each server to measure; {port} is filled in."""
    python = sys.executable
    serve = [python, "-m", "mlxqwen.cli", "serve", "--port", "{port}", "--keep-alive", "-1"]
    found = []
    if "mlx" in args.backends:
        found.append(("mlxqwen serve (MLX)", serve + [str(args.mlx), "--backend", "mlx"]))
        found.append(
            ("mlx_lm.server", [python, "-m", "mlx_lm", "server", "--model", str(args.mlx), "--port", "{port}"])
        )
    if "llama.cpp" not in args.backends or importlib.util.find_spec("llama_cpp") is None:
        return found
    found.append(("mlxqwen serve (llama.cpp)", serve + [str(args.gguf)]))
    if importlib.util.find_spec("llama_cpp.server") and importlib.util.find_spec("fastapi"):
        # interrupt_requests off: by default a new request cuts the one streaming
        command = [python, "-c", _LLAMA_SERVER, "--model", str(args.gguf), "--port", "{port}", "--n_ctx", "4096"]
        found.append(("llama-cpp-python server", command + ["--interrupt_requests", "False"]))
    else:
        print("llama-cpp-python's server is not installed (pip install 'llama-cpp-python[server]'): skipped")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mlx", type=Path, help="MLX model directory (default: random Qwen3.5-shaped weights)")
    parser.add_argument("--gguf", type=Path, default=demo.model_path("gguf"), help="GGUF file")
    parser.add_argument("--backends", nargs="+", default=["mlx", "llama.cpp"], help="which pairs to measure")
    parser.add_argument("--hidden", type=int, default=128, help="hidden size of the random MLX model")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--requests", type=int, default=2, help="requests per client")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--turns", type=int, default=10)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        if args.mlx is None:
            config = qwen3_5_config(hidden=args.hidden, layers=4)
            args.mlx = write_checkpoint(Path(tmp) / "random-4bit", config)
            for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
                shutil.copy(TOKENIZER / name, args.mlx / name)
        rows, chats = [], []
        for label, command in servers(args):
            with serving(command, Path(tmp) / "server.log") as (url, model):
                chat(url, model, [{"role": "user", "content": QUESTIONS[0]}], 8)  # warm up
                for clients in args.clients:
                    tps, p50, p95, failed = concurrency(url, model, clients, args.requests, args.max_tokens)
                    rows.append([label, clients, f"{tps:.1f}", f"{p50 * 1000:.0f}", f"{p95 * 1000:.0f}", failed])
                    print(" | ".join(str(c) for c in rows[-1]), flush=True)
                first, last = stateless_chat(url, model, args.turns, args.max_tokens)
                chats.append([label, f"{first * 1000:.0f}", f"{last * 1000:.0f}", f"{last / first:.2f}"])
    print_table(
        f"{args.requests} requests per client, at most {args.max_tokens} tokens each ({os.cpu_count()} cores)",
        ["server", "clients", "aggregate tok/s", "TTFT p50 ms", "TTFT p95 ms", "failed"],
        rows,
    )
    print_table(
        f"Stateless chat: TTFT of turn 1 and turn {args.turns}",
        ["server", "turn 1 ms", f"turn {args.turns} ms", "ratio"],
        chats,
    )


if __name__ == "__main__":
    main()
