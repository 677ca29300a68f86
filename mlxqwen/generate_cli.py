"""`mlxqwen generate` (one prompt, answer streamed to stdout, stats to stderr) and
`mlxqwen fit` (will this model and context fit in this machine's memory?)."""

from __future__ import annotations

import argparse
import json
import sys

from rich.console import Console
from rich.table import Table

from .backends import BACKENDS
from .cli import console, error, note
from .display import format_size, format_stats
from .events import Done, PrefillProgress, TextDelta, ThinkingDelta, ToolCall


def _number(cast: type, low: float, rule: str, above: bool = False):
    """An argparse type: a number of type `cast` at least `low` (above it with above=True)."""

    def parse(text: str):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if value < low or (above and value == low):
            raise argparse.ArgumentTypeError(f"{text} must be {rule}")
        return value

    return parse


def register(subparsers: argparse._SubParsersAction) -> None:
    gen = subparsers.add_parser("generate", help="answer one prompt", description="Answer one prompt.")
    gen.add_argument("model", help="a model name from mlxqwen list, a model directory or a .gguf file")
    gen.add_argument("-p", "--prompt", required=True, help="the prompt ('-' reads it from stdin)")
    gen.add_argument("--system", help="system message")
    gen.add_argument("--max-tokens", type=_number(int, 1, "at least 1"),
                     help="most tokens to generate, thinking included (default: until the model stops)")  # fmt: skip
    gen.add_argument("--temp", type=_number(float, 0, "0 or more"),
                     help="temperature, 0 is greedy (default: the model's recommended sampling)")  # fmt: skip
    gen.add_argument("--top-p", type=_number(float, 0, "above 0 and at most 1", above=True))
    gen.add_argument("--top-k", type=_number(int, 0, "0 (off) or more"))
    gen.add_argument("--seed", type=int)
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument("--no-think", action="store_true", help="answer without thinking first")
    gen.add_argument("--show-thinking", action="store_true", help="stream the thinking to stderr")
    gen.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    gen.add_argument("--json", action="store_true", help="print one JSON object (answer, thinking, tool calls, stats)")
    gen.add_argument("--max-context", type=_number(int, 1, "at least 1"),
                     help="context limit in tokens (default: what fits in memory)")  # fmt: skip
    gen.add_argument("--kv-bits", type=int, choices=(4, 8), help="quantize the K/V cache")
    gen.add_argument(
        "--backend",
        choices=BACKENDS,
        default="auto",
        help="mlx, llama.cpp, or auto (default): MLX on Apple Silicon, else llama.cpp when the model has GGUF weights",
    )
    gen.set_defaults(func=run_generate)

    fit = subparsers.add_parser("fit", help="check that a model fits in memory", description="Memory estimate.")
    fit.add_argument("model", help="a model name from mlxqwen list, or a model directory")
    fit.add_argument("--context", type=_number(int, 1, "at least 1"),
                     help="context length in tokens (default: the model's maximum)")  # fmt: skip
    fit.add_argument("--kv-bits", type=int, choices=(4, 8), help="quantized K/V cache")
    fit.set_defaults(func=run_fit)


def run_generate(args: argparse.Namespace) -> int:
    from .backends import load
    from .notes import collect, first_time

    err = console(stderr=True)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    overrides = {
        k: v
        for k, v in dict(
            max_tokens=args.max_tokens, temperature=args.temp, top_p=args.top_p, top_k=args.top_k, seed=args.seed
        ).items()
        if v is not None
    }
    with err.status(f"Loading {args.model}"), collect() as notes:
        llm = load(args.model, backend=args.backend, max_context=args.max_context, kv_bits=args.kv_bits)
    for text in notes:
        if first_time(text):
            note("generate", text)
    events = llm.stream(
        prompt,
        system=args.system,
        think=False if args.no_think else None,
        raw=args.raw,
        stop=tuple(args.stop),
        **overrides,
    )
    done = _print_events(events, args, err)
    if args.json:
        print(
            json.dumps(
                {
                    "text": done.text,
                    "thinking": done.thinking,
                    "tool_calls": [{"name": c.name, "arguments": c.arguments} for c in done.tool_calls],
                    "stats": vars(done.stats),
                },
                ensure_ascii=False,
            )
        )
    err.print(f"{llm.name} · {format_stats(done.stats, detail=True)}", style="dim", markup=False)
    if not done.text and not done.tool_calls:
        return error("generate", _no_answer(done, args))
    return 0


def _no_answer(done: Done, args: argparse.Namespace) -> str:
    """Why nothing was printed, and the ways out."""
    if not done.thinking:
        return "the model gave an empty answer"
    cut = " (--max-tokens reached)" if done.finish_reason == "length" else ""
    ways = ["more room with --max-tokens", "an answer without thinking with --no-think"]
    if not args.show_thinking:
        ways.append("the thinking with --show-thinking")
    return f"no answer: all {done.stats.generated_tokens} tokens went to thinking{cut}; try " + ", ".join(ways)


def _print_events(events, args: argparse.Namespace, err: Console) -> Done:
    """The answer and tool calls to stdout (unless --json), the thinking to stderr (with
    --show-thinking); each output ends with a newline, and nothing is printed for no answer."""
    out = sys.stdout
    line_open = thinking_shown = False
    for event in events:
        if isinstance(event, TextDelta) and not args.json:
            if thinking_shown:
                err.print()
                thinking_shown = False
            out.write(event.text)
            out.flush()
            line_open = not event.text.endswith("\n")
        elif isinstance(event, ThinkingDelta) and args.show_thinking:
            err.print(event.text, end="", style="dim", markup=False)
            thinking_shown = True
        elif isinstance(event, ToolCall) and not args.json:
            call = json.dumps(event.arguments, ensure_ascii=False)
            out.write(("\n" if line_open else "") + f"[tool call] {event.name}({call})\n")
            line_open = False
        elif isinstance(event, PrefillProgress) and err.is_terminal:
            err.print(f"prompt {event.done}/{event.total}", style="dim", end="\r")
        elif isinstance(event, Done):
            if line_open:
                out.write("\n")
            if thinking_shown:
                err.print()
            return event
    raise AssertionError("generation ended without a Done event")


def run_fit(args: argparse.Namespace) -> int:
    from . import memory
    from .library import resolve_model
    from .loader import default_dtype, load_model

    out = console()
    path = resolve_model(args.model)
    model, config = load_model(path, lazy=True)
    context = args.context or config.max_position_embeddings
    sizing = dict(weights=memory.weight_bytes(model), dtype=default_dtype(), kv_bits=args.kv_bits)
    plan = memory.estimate(config, context, **sizing)
    out.print(f"{path} with {context:,} tokens of context")
    if context > config.max_position_embeddings:
        out.print(f"the model is made for at most {config.max_position_embeddings:,} tokens", style="yellow")
    table = Table(show_header=False)
    for name, value in [
        ("weights", plan.weights),
        ("K/V cache" + (f" ({args.kv_bits}-bit)" if args.kv_bits else ""), plan.kv_cache),
        ("recurrent state", plan.recurrent_state),
        ("working memory", plan.working),
        ("total", plan.total),
        ("this machine allows", plan.budget),
    ]:
        table.add_row(name, format_size(value, binary=True))
    out.print(table)
    out.print(plan.verdict, style="green" if plan.fits else "red")
    if not plan.fits:
        longest = memory.largest_context(config, **sizing)
        out.print(f"longest context that fits: {longest:,} tokens" if longest else "no context fits")
    return 0 if plan.fits else 1
