"""`mlxqwen generate` (one prompt, answer streamed to stdout, stats to stderr) and
`mlxqwen fit` (will this model and context fit in this machine's memory?)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .backends import BACKENDS
from .errors import ContextLimitError, ModelLoadError
from .events import Done, PrefillProgress, TextDelta, ThinkingDelta, ToolCall

GiB = 1024**3
BACKEND_HELP = "mlx, llama.cpp, or auto (default): MLX on Apple Silicon, else llama.cpp when the model has GGUF weights"


def rope_scaling_arg(text: str) -> dict:
    """--rope-scaling: a JSON object, as Qwen's model cards write it for vLLM."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(
            f'{text!r} is not a JSON object; for example \'{{"rope_type": "yarn", "factor": 4.0}}\''
        )
    return value


def add_context_options(parser: argparse.ArgumentParser, context_flag: str = "--max-context") -> None:
    """--max-context (or fit's --context), --kv-bits, --rope-scaling and --backend: what `mlxqwen.load` takes."""
    if context_flag == "--max-context":
        parser.add_argument(
            "--max-context", type=int, help="context limit in tokens (default: the longest that fits in memory)"
        )
    parser.add_argument("--kv-bits", type=int, choices=(4, 8), help="quantize the K/V cache")
    parser.add_argument(
        "--rope-scaling",
        type=rope_scaling_arg,
        metavar="JSON",
        help='extend the context with YaRN, e.g. \'{"rope_type": "yarn", "factor": 4.0}\' '
        "(optionally with original_max_position_embeddings, the trained context)",
    )
    parser.add_argument("--backend", choices=BACKENDS, default="auto", help=BACKEND_HELP)


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
    add_context_options(gen)
    gen.set_defaults(func=run_generate)

    fit = subparsers.add_parser(
        "fit",
        help="check that a model fits in memory",
        description="Memory estimate, as mlxqwen.load checks it. MODEL may be a model directory (a config.json "
        "alone will do: the weights' size follows from it), a .gguf file, or a directory with GGUF weights.",
    )
    fit.add_argument("model", type=Path, help="model directory or .gguf file")
    fit.add_argument("--context", type=int, help="context length in tokens (default: the model's maximum)")
    add_context_options(fit, "--context")
    fit.set_defaults(func=run_fit)


def _error(console: Console, error: Exception) -> None:
    """One line, as the error says it (no wrapping, no markup read into it)."""
    console.print(f"[red]error:[/] {escape(str(error))}", soft_wrap=True, highlight=False)


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
            llm = load(
                args.model,
                backend=args.backend,
                max_context=args.max_context,
                kv_bits=args.kv_bits,
                rope_scaling=args.rope_scaling,
            )
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
        _error(err, e)
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
    from .backends import sizing
    from .config import yarn_hint

    console = Console()
    try:
        choice, plan = sizing(args.model, args.backend, kv_bits=args.kv_bits, rope_scaling=args.rope_scaling)
        context = args.context or plan.limit
        estimate = plan.estimate(context)
    except (ModelLoadError, ValueError) as e:
        _error(Console(stderr=True), e)
        return 1
    runtime = "llama.cpp" if choice.backend == "llama.cpp" else "MLX"
    console.print(f"{choice.path} on {runtime} with {context:,} tokens of context", soft_wrap=True, highlight=False)
    table = Table(show_header=False)
    for name, value in [
        ("weights", estimate.weights),
        ("K/V cache" + (f" ({args.kv_bits}-bit)" if args.kv_bits else ""), estimate.kv_cache),
        ("recurrent state", estimate.recurrent_state),
        ("working memory", estimate.working),
        ("runtime", estimate.runtime),
        ("total", estimate.total),
        ("this machine allows", estimate.budget),
    ]:
        table.add_row(name, f"{value / GiB:.2f} GiB")
    console.print(table)
    if context > plan.limit:
        console.print(
            f"[red]past the {plan.limit:,} tokens this model handles[/]; {escape(yarn_hint(context, plan.trained))}",
            soft_wrap=True,
            highlight=False,
        )
        return 1
    console.print(("[green]" if estimate.fits else "[red]") + estimate.verdict)
    if not estimate.fits:
        longest = memory.largest_context(plan)
        console.print(f"longest context that fits: {longest:,} tokens" if longest else "no context fits")
    return 0 if estimate.fits else 1
