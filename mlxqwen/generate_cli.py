"""`mlxqwen generate` (one prompt, answer streamed to stdout, stats to stderr) and
`mlxqwen fit` (will this model and context fit in this machine's memory?)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from rich.console import Console
from rich.table import Table

from .backends import BACKENDS
from .cli import console, error, note
from .display import format_size, format_stats
from .distributed import PARALLEL
from .events import Done, PrefillProgress, TextDelta, ThinkingDelta, ToolCall

BACKEND_HELP = "mlx, llama.cpp, or auto (default): MLX on Apple Silicon, else llama.cpp when the model has GGUF weights"


def number_arg(cast: type, low: float, rule: str, above: bool = False):
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


def add_context_options(parser: argparse.ArgumentParser, context_flag: str = "--max-context", mtp: bool = True) -> None:
    """--max-context (or fit's --context), --kv-bits, --rope-scaling, --backend and (with mtp=True)
    --no-mtp: what `mlxqwen.load` takes (`load_options` hands them over)."""
    if context_flag == "--max-context":
        parser.add_argument("--max-context", type=number_arg(int, 1, "at least 1"),
                            help="context limit in tokens (default: the longest that fits in memory)")  # fmt: skip
    parser.add_argument("--kv-bits", type=int, choices=(4, 8), help="quantize the K/V cache")
    parser.add_argument(
        "--rope-scaling",
        type=rope_scaling_arg,
        metavar="JSON",
        help='extend the context with YaRN, e.g. \'{"rope_type": "yarn", "factor": 4.0}\' '
        "(optionally with original_max_position_embeddings, the trained context)",
    )
    parser.add_argument("--backend", choices=BACKENDS, default="auto", help=BACKEND_HELP)
    parser.add_argument(
        "--parallel",
        choices=PARALLEL,
        default="pipeline",
        help="under mlx.launch, split the model across its processes by layers (pipeline) or within layers (tensor)",
    )
    if mtp:
        parser.add_argument("--no-mtp", action="store_true", help="no speculative decoding with the model's MTP head")


def load_options(args: argparse.Namespace) -> dict[str, Any]:
    """The keywords of `mlxqwen.load` that the options of `add_context_options` give."""
    options = dict(backend=args.backend, max_context=args.max_context, kv_bits=args.kv_bits, parallel=args.parallel)
    return {**options, "rope_scaling": args.rope_scaling, "mtp": False if args.no_mtp else "auto"}


def register(subparsers: argparse._SubParsersAction) -> None:
    gen = subparsers.add_parser("generate", help="answer one prompt", description="Answer one prompt.")
    gen.add_argument("model", help="a model name from mlxqwen list, a model directory or a .gguf file")
    gen.add_argument("-p", "--prompt", required=True, help="the prompt ('-' reads it from stdin)")
    gen.add_argument("--system", help="system message")
    gen.add_argument("--max-tokens", type=number_arg(int, 1, "at least 1"),
                     help="most tokens to generate, thinking included (default: until the model stops)")  # fmt: skip
    gen.add_argument("--temp", type=number_arg(float, 0, "0 or more"),
                     help="temperature, 0 is greedy (default: the model's recommended sampling)")  # fmt: skip
    gen.add_argument("--top-p", type=number_arg(float, 0, "above 0 and at most 1", above=True))
    gen.add_argument("--top-k", type=number_arg(int, 0, "0 (off) or more"))
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
        description="Memory estimate, as mlxqwen.load checks it. MODEL may be a name from mlxqwen list, a model "
        "directory (a config.json alone will do: the weights' size follows from it), a .gguf file, or a directory "
        "with GGUF weights.",
    )
    fit.add_argument("model", help="a model name from mlxqwen list, a model directory or a .gguf file")
    fit.add_argument("--context", type=number_arg(int, 1, "at least 1"),
                     help="context length in tokens (default: the model's maximum)")  # fmt: skip
    add_context_options(fit, "--context", mtp=False)
    hosts = fit.add_mutually_exclusive_group()
    hosts.add_argument("--hosts", help="split across these hosts (a,b), each with this machine's memory")
    hosts.add_argument(
        "--hostfile",
        help='split across the hosts of this mlx.launch hostfile; each may give "memory_gb" (16 for a 16 GB Mac)',
    )
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
        llm = load(args.model, **load_options(args))
    events = llm.stream(
        prompt,
        system=args.system,
        think=False if args.no_think else None,
        raw=args.raw,
        stop=tuple(args.stop),
        **overrides,
    )
    done = _print_events(events, args, err)
    for text in notes:  # advice once the answer is there: never before an error
        if first_time(text):
            note("generate", text)
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
    from .backends import sizing
    from .config import yarn_hint

    if args.hosts or args.hostfile:
        return _fit_hosts(args)
    out = console()
    choice, plan = sizing(args.model, args.backend, kv_bits=args.kv_bits, rope_scaling=args.rope_scaling)
    context = args.context or plan.limit
    estimate = plan.estimate(context)
    runtime = "llama.cpp" if choice.backend == "llama.cpp" else "MLX"
    out.print(f"{choice.path} on {runtime} with {context:,} tokens of context")
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
        table.add_row(name, format_size(value, binary=True))
    out.print(table)
    if context > plan.limit:
        out.print(f"past the {plan.limit:,} tokens this model handles; {yarn_hint(context, plan.trained)}", style="red")
        return 1
    out.print(estimate.verdict, style="green" if estimate.fits else "red")
    if not estimate.fits:
        longest = memory.largest_context(plan)
        out.print(f"longest context that fits: {longest:,} tokens" if longest else "no context fits")
    return 0 if estimate.fits else 1


def _fit_hosts(args: argparse.Namespace) -> int:
    """How the model would split across hosts (`mlxqwen.distributed`), and whether each part fits."""
    from . import memory
    from .backends.mlx import split_sizing
    from .config import parse_yarn, yarn_hint
    from .distributed import read_hosts
    from .library import resolve_model

    hosts = read_hosts(args.hosts, args.hostfile)
    here = memory.memory_budget()
    # a host of known memory allows what this machine's policy allows of its own
    budgets = [here if gb is None else int(gb * 2**30 * here / memory.total_memory()) for _, gb in hosts]
    path = resolve_model(args.model)
    names = [name for name, _ in hosts]
    parts = split_sizing(path, names, budgets, args.parallel, kv_bits=args.kv_bits, yarn=parse_yarn(args.rope_scaling))
    limit, trained = parts[0][1].limit, parts[0][1].trained
    context = args.context or limit
    out = console()
    if context > limit:
        out.print(f"past the {limit:,} tokens this model handles; {yarn_hint(context, trained)}", style="red")
        return 1
    out.print(f"{path} on MLX across {len(hosts)} hosts ({args.parallel}) with {context:,} tokens of context")
    table = Table("host", "holds", "weights", "K/V + state", "total", "allows", "sends per token", "")
    fits = True
    for (part, plan), budget in zip(parts, budgets, strict=True):
        estimate = plan.estimate(context, budget=budget)
        fits = fits and estimate.fits
        table.add_row(
            part.host,
            part.what,
            format_size(estimate.weights, binary=True),
            format_size(estimate.kv_cache + estimate.recurrent_state, binary=True),
            format_size(estimate.total, binary=True),
            format_size(budget, binary=True),
            format_size(part.sent, binary=True),
            "fits" if estimate.fits else "does not fit",
        )
    out.print(table)
    out.print("fits on every host" if fits else "does not fit on every host", style="green" if fits else "red")
    return 0 if fits else 1
