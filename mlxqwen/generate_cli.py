"""`mlxqwen generate` (one prompt, answer streamed to stdout, stats to stderr) and
`mlxqwen fit` (will this model and context fit in this machine's memory?)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .backends import BACKENDS
from .errors import ContextLimitError, ModelLoadError
from .events import Done, PrefillProgress, TextDelta, ThinkingDelta, ToolCall

GiB = 1024**3


def register(subparsers: argparse._SubParsersAction) -> None:
    gen = subparsers.add_parser("generate", help="answer one prompt", description="Answer one prompt.")
    gen.add_argument("model", type=Path, help="model directory or .gguf file")
    gen.add_argument("-p", "--prompt", required=True, help="the prompt ('-' reads it from stdin)")
    gen.add_argument("--system", help="system message")
    gen.add_argument("--max-tokens", type=int, help="most tokens to generate (default: until the model stops)")
    gen.add_argument("--temp", type=float, help="temperature (default: the model's recommended sampling)")
    gen.add_argument("--top-p", type=float)
    gen.add_argument("--top-k", type=int)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument("--no-think", action="store_true", help="answer without thinking first")
    gen.add_argument("--show-thinking", action="store_true", help="stream the thinking to stderr")
    gen.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    gen.add_argument("--json", action="store_true", help="print one JSON object (answer, thinking, tool calls, stats)")
    gen.add_argument("--max-context", type=int, help="context limit in tokens (default: what fits in memory)")
    gen.add_argument("--kv-bits", type=int, choices=(4, 8), help="quantize the K/V cache")
    gen.add_argument(
        "--backend",
        choices=BACKENDS,
        default="auto",
        help="mlx, llama.cpp, or auto (default): MLX on Apple Silicon, else llama.cpp when the model has GGUF weights",
    )
    gen.set_defaults(func=run_generate)

    fit = subparsers.add_parser("fit", help="check that a model fits in memory", description="Memory estimate.")
    fit.add_argument("model", type=Path, help="model directory")
    fit.add_argument("--context", type=int, help="context length in tokens (default: the model's maximum)")
    fit.add_argument("--kv-bits", type=int, choices=(4, 8), help="quantized K/V cache")
    fit.set_defaults(func=run_fit)


def run_generate(args: argparse.Namespace) -> int:
    from .backends import load

    err = Console(stderr=True)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    overrides = {
        k: v
        for k, v in dict(
            max_tokens=args.max_tokens, temperature=args.temp, top_p=args.top_p, top_k=args.top_k, seed=args.seed
        ).items()
        if v is not None
    }
    try:
        with err.status(f"Loading {args.model}"):
            llm = load(args.model, backend=args.backend, max_context=args.max_context, kv_bits=args.kv_bits)
        events = llm.stream(
            prompt,
            system=args.system,
            think=False if args.no_think else None,
            raw=args.raw,
            stop=tuple(args.stop),
            **overrides,
        )
        done = _print_events(events, args, err)
    except (ModelLoadError, ContextLimitError, ValueError) as e:
        err.print(f"[red]error:[/] {e}")
        return 1
    except KeyboardInterrupt:
        return 130
    s = done.stats
    if args.json:
        print(
            json.dumps(
                {
                    "text": done.text,
                    "thinking": done.thinking,
                    "tool_calls": [{"name": c.name, "arguments": c.arguments} for c in done.tool_calls],
                    "stats": vars(s),
                },
                ensure_ascii=False,
            )
        )
    err.print(
        f"[dim]{llm.name} | prompt: {s.prompt_tokens} tokens, {s.prompt_tps:.1f} tok/s | "
        f"generation: {s.generated_tokens} tokens, {s.generation_tps:.1f} tok/s | "
        f"ttft {s.ttft:.2f} s | peak memory {s.peak_memory / GiB:.2f} GiB | {s.finish_reason}[/]"
    )
    return 0


def _print_events(events, args: argparse.Namespace, err: Console) -> Done:
    out = sys.stdout
    thinking_shown = False
    for event in events:
        if isinstance(event, TextDelta) and not args.json:
            if thinking_shown:
                err.print()
                thinking_shown = False
            out.write(event.text)
            out.flush()
        elif isinstance(event, ThinkingDelta) and args.show_thinking:
            err.print(event.text, end="", style="dim", markup=False, highlight=False)
            thinking_shown = True
        elif isinstance(event, ToolCall) and not args.json:
            out.write(f"\n[tool call] {event.name}({json.dumps(event.arguments, ensure_ascii=False)})\n")
        elif isinstance(event, PrefillProgress):
            err.print(f"[dim]prompt {event.done}/{event.total}[/]", end="\r")
        elif isinstance(event, Done):
            if not args.json:
                out.write("\n")
            return event
    raise AssertionError("generation ended without a Done event")


def run_fit(args: argparse.Namespace) -> int:
    from . import memory
    from .loader import default_dtype, load_model

    console = Console()
    try:
        model, config = load_model(args.model, lazy=True)
    except ModelLoadError as e:
        Console(stderr=True).print(f"[red]error:[/] {e}")
        return 1
    context = args.context or config.max_position_embeddings
    sizing = dict(weights=memory.weight_bytes(model), dtype=default_dtype(), kv_bits=args.kv_bits)
    plan = memory.estimate(config, context, **sizing)
    console.print(f"{args.model} with {context:,} tokens of context")
    if context > config.max_position_embeddings:
        console.print(f"[yellow]the model is made for at most {config.max_position_embeddings:,} tokens[/]")
    table = Table(show_header=False)
    for name, value in [
        ("weights", plan.weights),
        ("K/V cache" + (f" ({args.kv_bits}-bit)" if args.kv_bits else ""), plan.kv_cache),
        ("recurrent state", plan.recurrent_state),
        ("working memory", plan.working),
        ("total", plan.total),
        ("this machine allows", plan.budget),
    ]:
        table.add_row(name, f"{value / GiB:.2f} GiB")
    console.print(table)
    console.print(("[green]" if plan.fits else "[red]") + plan.verdict)
    if not plan.fits:
        longest = memory.largest_context(config, **sizing)
        console.print(f"longest context that fits: {longest:,} tokens" if longest else "no context fits")
    return 0 if plan.fits else 1
