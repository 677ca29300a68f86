"""Soak: does memory stay flat over thousands of generations through one loaded model?

For each backend, one model is loaded once and driven by three kinds of use in turn, each
with requests stopped midway among them:

- api: `llm.generate` and `llm.stream` from 4 threads at once, short and long prompts and
  replies; every 7th request cancelled through `cancel=threading.Event()` after a few events,
  every 11th abandoned (the caller stops reading its stream).
- chat: `ChatSession`s from 2 threads: turns, `regenerate`, `edit_last`, and a turn cancelled
  with `session.cancel()`; each session is dropped after 6 calls.
- server: `mlxqwen serve`'s app (uvicorn on 127.0.0.1, a free port, in this process, serving
  the same loaded model), 4 clients on /v1/chat/completions, streamed and not; every 6th
  streamed request disconnected after a few chunks.

Resident memory (/proc/self/statm) and MLX memory (active, cache, peak) are sampled after every
request. Figures: the baseline before the load, after a warm-up (a short round of all three
kinds), at the end, the growth after the warm-up (aim: under 5 %), and the memory once the
model is closed and collected, against the baseline (and after glibc's malloc_trim, which tells
memory the allocator keeps from memory still held). The prefix cache's entries (states kept
across requests, up to its budget) are counted apart: "growth less prefix cache". Every reply
runs to its max_tokens (EOS is ignored) so that lengths are as set. A plot of memory over
requests goes to --plot; it needs matplotlib (`pip install "mlxqwen[bench]"`).

Models: the demo model (MLX 4-bit and its GGUF), or with --hidden a Qwen3.5-shaped random 4-bit
model built as in bench_batch.py (and its GGUF Q4_K_M).

    python benchmarks/soak.py [--requests 2000] [--backend mlx llama.cpp] [--plot soak.png]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import itertools
import os
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import mlx.core as mx
from common import QUESTIONS, print_table

import mlxqwen
from mlxqwen import demo
from mlxqwen.events import Event
from mlxqwen.library import model_at
from mlxqwen.llm import last

MiB = 2**20
PAGE = os.sysconf("SC_PAGE_SIZE")
LONG = " ".join(f"Fact {i}: {q}" for i, q in enumerate(QUESTIONS * 12)) + " Now answer the last one."
SHORT_TOKENS, LONG_TOKENS = 12, 96


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


@dataclass
class Sample:
    request: int
    phase: str
    rss: int
    active: int
    cache: int
    prefix_cache: int


@dataclass
class Soak:
    """The samples of one backend's run; `record` is called after every request, from any thread."""

    samples: list[Sample] = field(default_factory=list)
    outcomes: dict[str, int] = field(default_factory=lambda: {"ok": 0, "cancelled": 0, "failed": 0})
    phase: str = "load"
    prefix_cache: Callable[[], int] = lambda: 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, outcome: str = "ok") -> None:
        with self.lock:
            self.outcomes[outcome] += 1
            self.samples.append(
                Sample(
                    len(self.samples),
                    self.phase,
                    rss(),
                    mx.get_active_memory(),
                    mx.get_cache_memory(),
                    self.prefix_cache(),
                )
            )

    def run(self, phase: str, workers: int, count: int, work: Callable[[int], str]) -> None:
        """`count` calls of `work(i)` (which returns its outcome) spread over `workers` threads."""
        self.phase = phase
        numbers = iter(range(count))
        lock = threading.Lock()

        def worker() -> None:
            while True:
                with lock:
                    i = next(numbers, None)
                if i is None:
                    return
                try:
                    outcome = work(i)
                except Exception as e:  # a soak counts failures and goes on
                    print(f"{phase} request {i} failed: {type(e).__name__}: {e}")
                    outcome = "failed"
                self.record(outcome)

        threads = [threading.Thread(target=worker, name=f"{phase}-{w}") for w in range(workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()


def prompt_and_length(i: int) -> tuple[str, int]:
    return (LONG, LONG_TOKENS) if i % 8 == 0 else (QUESTIONS[i % len(QUESTIONS)], SHORT_TOKENS)


def stopped_midway(events: Iterator[Event], stop: Callable[[], None]) -> str:
    """Read `events`, calling `stop` after the third; the outcome its Done reports."""
    done = None
    for n, event in enumerate(events):
        done = event
        if n == 3:
            stop()
    return "cancelled" if done.finish_reason == "cancelled" else "ok"


def api_request(llm, i: int) -> str:
    prompt, max_tokens = prompt_and_length(i)
    if i % 7 == 3:
        cancel = threading.Event()
        return stopped_midway(llm.stream(prompt, max_tokens=LONG_TOKENS, cancel=cancel), cancel.set)
    if i % 11 == 5:
        events = llm.stream(prompt, max_tokens=LONG_TOKENS)
        for _ in itertools.islice(events, 3):
            pass
        events.close()  # the caller stops reading: the request is cancelled
        return "cancelled"
    if i % 2:
        llm.generate(prompt, max_tokens=max_tokens)
    else:
        last(llm.stream(prompt, max_tokens=max_tokens))
    return "ok"


def chat_worker(llm) -> Callable[[int], str]:
    """Each thread keeps its own session, replaced every 6 calls: send, send, regenerate,
    edit_last, a cancelled turn, send."""
    local = threading.local()

    def call(i: int) -> str:
        step = getattr(local, "step", 0)
        local.step = step + 1
        if step % 6 == 0:
            local.session = llm.chat(system="You are terse.", max_tokens=SHORT_TOKENS)
        session, prompt, max_tokens = local.session, QUESTIONS[i % len(QUESTIONS)], SHORT_TOKENS
        match step % 6:
            case 2:
                session.regenerate(max_tokens=max_tokens)
            case 3:
                session.edit_last(QUESTIONS[(i + 1) % len(QUESTIONS)], max_tokens=max_tokens)
            case 4:
                return stopped_midway(session.stream(prompt, max_tokens=LONG_TOKENS), session.cancel)
            case _:
                session.send(prompt, max_tokens=max_tokens)
        return "ok"

    return call


@contextlib.contextmanager
def serving(llm, path: Path) -> Iterator[tuple[str, str]]:
    """`mlxqwen serve`'s app on a free loopback port, in this process, serving `llm`; yields
    (URL, model name) and stops the server in the end."""
    import uvicorn

    from mlxqwen.server import ModelPool, create_app

    model = model_at(path)
    pool = ModelPool([model], keep_alive=None, load=lambda _: llm, budget=2**62)
    app = create_app(pool, preload=[model.name])
    sock = socket.create_server(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn")
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.05)
        yield url, model.name
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def server_worker(url: str, model: str) -> Callable[[int], str]:
    local = threading.local()

    def call(i: int) -> str:
        if not hasattr(local, "client"):
            local.client = httpx.Client(base_url=url, timeout=300)
        prompt, max_tokens = prompt_and_length(i)
        disconnect = i % 6 == 1
        body = {
            "model": model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": LONG_TOKENS if disconnect else max_tokens,
            "stream": i % 3 != 0,
        }
        if not body["stream"]:
            local.client.post("/v1/chat/completions", json=body).raise_for_status()
            return "ok"
        with local.client.stream("POST", "/v1/chat/completions", json=body) as r:
            r.raise_for_status()
            for n, _ in enumerate(r.iter_lines()):
                if disconnect and n == 3:
                    break
        if disconnect:  # the connection is closed mid-stream: the server must cancel the request
            local.client.close()
            del local.client
            return "cancelled"
        return "ok"

    return call


def soak(path: Path, backend: str, requests: int, max_context: int, prefix_cache: int | bool) -> tuple[Soak, dict]:
    gc.collect()
    figures = {"baseline": rss()}
    run = Soak()
    llm = mlxqwen.load(path, backend=backend, max_context=max_context, prefix_cache=prefix_cache)
    llm.tokenizer.eos_token_ids = set()  # every reply runs to its max_tokens
    run.prefix_cache = lambda: llm.prefix_cache.nbytes
    run.record()
    figures["loaded"] = rss()
    warm = max(10, requests // 30)
    shares = {"api": requests * 4 // 10, "chat": requests * 3 // 10}
    shares["server"] = requests - sum(shares.values())
    chat = chat_worker(llm)
    with serving(llm, path) as (url, model):
        phases = {
            "api": (4, lambda i: api_request(llm, i)),
            "chat": (2, chat),
            "server": (4, server_worker(url, model)),
        }
        for name, (workers, work) in phases.items():
            run.run(f"warm-up {name}", workers, warm, work)
        gc.collect()
        run.record()
        figures["warm"], figures["warm_active"] = rss(), mx.get_active_memory()
        figures["warm_at"] = len(run.samples)
        mx.reset_peak_memory()
        for name, (workers, work) in phases.items():
            start = time.perf_counter()
            run.run(name, workers, shares[name], work)
            print(f"{backend} {name}: {shares[name]} requests in {time.perf_counter() - start:.0f} s")
    gc.collect()
    run.record()
    figures["end"], figures["end_active"], figures["peak_mlx"] = rss(), mx.get_active_memory(), mx.get_peak_memory()
    figures["max_rss"] = max(s.rss for s in run.samples[figures["warm_at"] :])
    figures["prefix_cache"] = llm.prefix_cache.nbytes
    figures["warm_prefix_cache"] = run.samples[figures["warm_at"] - 1].prefix_cache
    llm.close()
    run.prefix_cache = lambda: 0
    llm = chat = phases = None
    gc.collect()
    mx.clear_cache()
    figures["unloaded"], figures["unloaded_active"] = rss(), mx.get_active_memory()
    ctypes.CDLL(None).malloc_trim(0)  # glibc: hand freed heap pages back, to tell what is kept from what is lost
    figures["trimmed"] = rss()
    return run, figures


def percent(part: int, whole: int) -> str:
    return f"{100 * part / whole:+.2f} %"


def plot(runs: dict[str, tuple[Soak, dict]], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("the plot needs matplotlib: pip install matplotlib")
        return
    fig, axes = plt.subplots(len(runs), 1, figsize=(11, 4 * len(runs)), squeeze=False)
    for ax, (backend, (run, figures)) in zip(axes[:, 0], runs.items(), strict=True):
        x = [s.request for s in run.samples]
        ax.plot(x, [s.rss / MiB for s in run.samples], label="resident", lw=1)
        if backend == "mlx":
            ax.plot(x, [s.active / MiB for s in run.samples], label="MLX active", lw=1)
            ax.plot(x, [s.cache / MiB for s in run.samples], label="MLX cache", lw=1)
        ax.plot(x, [s.prefix_cache / MiB for s in run.samples], label="prefix cache entries", lw=1)
        ax.axhline(figures["baseline"] / MiB, color="grey", ls="--", lw=1, label="baseline (before load)")
        ax.axhline(figures["unloaded"] / MiB, color="black", ls=":", lw=1, label="after unload")
        for phase, group in itertools.groupby(run.samples, key=lambda s: s.phase):
            first = next(group).request
            ax.axvline(first, color="lightgrey", lw=0.8)
            ax.text(first, ax.get_ylim()[1], f" {phase}", fontsize=7, va="top", rotation=90)
        growth = 100 * (figures["end"] - figures["warm"]) / figures["warm"]
        ax.set_title(f"{backend}: resident memory {growth:+.1f} % after warm-up")
        ax.set_xlabel("requests")
        ax.set_ylabel("MiB")
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=2000, help="requests per backend after the warm-up")
    ap.add_argument("--backend", nargs="+", default=["mlx", "llama.cpp"], choices=["mlx", "llama.cpp"])
    ap.add_argument("--max-context", type=int, default=4096)
    ap.add_argument("--hidden", type=int, help="a random Qwen3.5-shaped 4-bit model of this hidden size")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--prefix-cache", type=int, help="the prefix cache's budget in MiB (default: load's)")
    ap.add_argument("--plot", type=Path, default=Path("soak.png"))
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        if args.hidden:
            from bench_batch import build

            models = build(Path(tmp), args.hidden, args.layers, args.backend)
        else:
            models = {"mlx": demo.model_path(), "llama.cpp": demo.model_path("gguf")}
        budget = True if args.prefix_cache is None else args.prefix_cache * MiB
        runs = {b: soak(models[b], b, args.requests, args.max_context, budget) for b in args.backend}

    rows, mlx_rows, phases = [], [], []
    for backend, (run, f) in runs.items():
        held = f["prefix_cache"] - f["warm_prefix_cache"]  # bounded by the cache's budget, by design
        rows.append(
            [
                backend,
                "/".join(str(run.outcomes[k]) for k in ("ok", "cancelled", "failed")),
                f["baseline"] / MiB,
                f["warm"] / MiB,
                f["end"] / MiB,
                percent(f["end"] - f["warm"], f["warm"]),
                percent(f["end"] - f["warm"] - held, f["warm"]),
                f["unloaded"] / MiB,
                f"{(f['unloaded'] - f['baseline']) / MiB:+.1f}",
                f"{(f['trimmed'] - f['baseline']) / MiB:+.1f}",
            ]
        )
        mlx_rows.append(
            [
                backend,
                f["loaded"] / MiB,
                f["max_rss"] / MiB,
                f["warm_active"] / MiB,
                f["end_active"] / MiB,
                f["peak_mlx"] / MiB,
                f"{f['warm_prefix_cache'] / MiB:.1f} -> {f['prefix_cache'] / MiB:.1f}",
                f["unloaded_active"] / MiB,
            ]
        )
        for phase, group in itertools.groupby(run.samples[f["warm_at"] :], key=lambda s: s.phase):
            group = list(group)
            a, b = group[0], group[-1]
            net = b.rss - a.rss - (b.prefix_cache - a.prefix_cache)
            phases.append(
                [
                    backend,
                    phase,
                    len(group),
                    a.rss / MiB,
                    b.rss / MiB,
                    percent(b.rss - a.rss, a.rss),
                    percent(net, a.rss),
                ]
            )
    print_table(
        f"Soak: resident memory (MiB), {args.requests} requests per backend after the warm-up",
        [
            "backend",
            "ok/cancelled/failed",
            "baseline",
            "after warm-up",
            "end",
            "growth",
            "growth less prefix cache",
            "after unload",
            "unload - baseline",
            "after malloc_trim - baseline",
        ],
        rows,
    )
    print_table(
        "Soak: more figures (MiB)",
        [
            "backend",
            "RSS loaded",
            "RSS max",
            "MLX active warm",
            "MLX active end",
            "MLX peak",
            "prefix cache",
            "MLX active unloaded",
        ],
        mlx_rows,
    )
    print_table(
        "Resident memory per phase (MiB)",
        ["backend", "phase", "requests", "start", "end", "growth", "less prefix cache"],
        phases,
    )
    plot(runs, args.plot)


if __name__ == "__main__":
    main()
