"""`mlxqwen pull REPO` (download, convert, memory check), `mlxqwen list` (local models) and
`mlxqwen rm NAME` (remove one)."""

from __future__ import annotations

import argparse
import sys
import time

from rich.console import Console
from rich.table import Table

GB = 1e9


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "pull",
        help="download a Qwen model from Hugging Face and convert it for this machine",
        description="Download a Qwen model from the Hugging Face Hub (or read a local Hugging Face directory), "
        "check that it fits in this machine's memory, and convert it into the model library.",
    )
    p.add_argument("source", help="Hub repo id (e.g. Qwen/Qwen3.6-27B) or a local Hugging Face directory")
    p.add_argument("--recipe", default="4bit", help="quantization recipe (default 4bit; see mlxqwen convert --help)")
    p.add_argument("--revision", help="Hub branch, tag or commit (default: main)")
    p.add_argument("--force", action="store_true", help="pull even if it will not fit in memory; convert again")
    p.set_defaults(func=run_pull)

    p = subparsers.add_parser("list", help="list local models", description="List the models on this machine.")
    p.set_defaults(func=run_list)

    p = subparsers.add_parser("rm", help="remove a local model", description="Remove local models (see mlxqwen list).")
    p.add_argument("names", nargs="+", metavar="NAME", help="model name as mlxqwen list shows it")
    p.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")
    p.set_defaults(func=run_rm)


def run_pull(args: argparse.Namespace) -> int:
    from huggingface_hub.utils import logging as hub_logging

    from mlxqwen.convert.errors import ConvertError
    from mlxqwen.convert.progress import make_progress

    from .errors import ModelLoadError
    from .pull import pull

    hub_logging.set_verbosity_error()  # offline, its retry warnings would bury the one-line error
    err = Console(stderr=True)
    try:
        with make_progress(err) as progress:
            pulled = pull(args.source, recipe=args.recipe, revision=args.revision, force=args.force, progress=progress)
    except (ConvertError, ModelLoadError) as e:
        err.print(f"[red]error:[/] {e}", highlight=False)
        return 1
    except KeyboardInterrupt:
        err.print("interrupted; nothing was added to the library")
        return 130
    console = Console()
    console.print(f"{pulled.name}: {pulled.action} ({pulled.path})", highlight=False)
    console.print(f"memory at {pulled.plan.context:,} tokens of context: {pulled.plan.verdict}", highlight=False)
    console.print(f"chat with it: mlxqwen chat {pulled.name}", highlight=False)
    return 0


def run_list(args: argparse.Namespace) -> int:
    from .library import local_models

    table = Table(box=None, pad_edge=False)
    for column in ("NAME", "FORMAT", "WEIGHTS", "SIZE", "MODIFIED", "WHERE"):
        table.add_column(column, justify="right" if column == "SIZE" else "left")
    for model in local_models():
        fmt = "MLX" if model.format == "mlx" else "GGUF"
        table.add_row(
            model.name, fmt, model.weights, _size(model.size_bytes), _ago(model.modified),
            {"library": "library", "hf-cache": "Hugging Face cache", "demo": "built in"}[model.where],
        )  # fmt: skip
    Console().print(table)
    return 0


def run_rm(args: argparse.Namespace) -> int:
    from rich.prompt import Confirm

    from .library import ModelNotFoundError, find_model, remove_model

    err = Console(stderr=True)
    try:
        models = [find_model(name) for name in args.names]
    except ModelNotFoundError as e:
        err.print(f"[red]error:[/] {e}", highlight=False)
        return 1
    code = 0
    for model in models:
        if not args.yes:
            if not sys.stdin.isatty():
                err.print(f"[red]error:[/] {model.name}: pass -y to remove without a prompt", highlight=False)
                return 1
            if not Confirm.ask(f"Remove {model.name} ({_size(model.size_bytes)}, {model.path})?", console=err):
                continue
        try:
            remove_model(model)
        except (ValueError, OSError) as e:
            err.print(f"[red]error:[/] {e}", highlight=False)
            code = 1
            continue
        Console().print(f"removed {model.name}", highlight=False)
    return code


def _size(n: int) -> str:
    return f"{n / GB:.1f} GB" if n >= GB else f"{n / 1e6:.0f} MB"


def _ago(t: float) -> str:
    seconds = max(0.0, time.time() - t)
    for unit, span in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= span:
            n = int(seconds // span)
            return f"{n} {unit}{'s' if n > 1 else ''} ago"
    return "just now"
