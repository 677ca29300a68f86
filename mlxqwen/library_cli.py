"""`mlxqwen pull REPO` (download, convert, memory check), `mlxqwen list` (local models) and
`mlxqwen rm NAME` (remove one)."""

from __future__ import annotations

import argparse
import sys
import time

from rich.table import Table

from .cli import console, error
from .display import format_size


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

    from mlxqwen.convert.progress import make_progress

    from .pull import pull

    hub_logging.set_verbosity_error()  # offline, its retry warnings would bury the one-line error
    try:
        with make_progress(console(stderr=True)) as progress:
            pulled = pull(args.source, recipe=args.recipe, revision=args.revision, force=args.force, progress=progress)
    except KeyboardInterrupt:
        print("mlxqwen pull: interrupted; nothing was added to the library", file=sys.stderr)
        return 130
    out = console()
    out.print(f"{pulled.name}: {pulled.action} ({pulled.path})")
    out.print(f"memory at {pulled.plan.context:,} tokens of context: {pulled.plan.verdict}")
    out.print(f"chat with it: mlxqwen chat {pulled.name}")
    return 0


def run_list(args: argparse.Namespace) -> int:
    from .library import FORMAT_LABELS, local_models

    table = Table(box=None, pad_edge=False)
    for column in ("NAME", "FORMAT", "WEIGHTS", "SIZE", "MODIFIED", "WHERE"):
        table.add_column(column, justify="right" if column == "SIZE" else "left")
    for model in local_models():
        table.add_row(
            model.name, FORMAT_LABELS[model.format], model.weights, format_size(model.size_bytes), _ago(model.modified),
            {"library": "library", "hf-cache": "Hugging Face cache", "demo": "built in"}[model.where],
        )  # fmt: skip
    console().print(table)
    return 0


def run_rm(args: argparse.Namespace) -> int:
    from rich.prompt import Confirm

    from .library import check_removable, find_model, remove_model

    models = [find_model(name) for name in args.names]
    for model in models:  # refused before anything is asked or removed
        check_removable(model)
    if not args.yes and not sys.stdin.isatty():
        return error("rm", "pass -y to remove without a prompt")
    code = 0
    for model in models:
        question = f"Remove {model.name} ({format_size(model.size_bytes)}, {model.path})?"
        if not args.yes and not Confirm.ask(question, console=console(stderr=True)):
            continue
        try:
            remove_model(model)
        except OSError as e:
            code = error("rm", f"{model.path}: {e.strerror}")
            continue
        console().print(f"removed {model.name}")
    return code


def _ago(t: float) -> str:
    seconds = max(0.0, time.time() - t)
    for unit, span in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= span:
            n = int(seconds // span)
            return f"{n} {unit}{'s' if n > 1 else ''} ago"
    return "just now"
