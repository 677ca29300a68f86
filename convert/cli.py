"""`mlxqwen convert SRC [-o OUT] [options]`, `mlxqwen convert --batch FILE.toml` and
`mlxqwen eval MODEL --against SRC`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mlxqwen.cli import console
from mlxqwen.display import format_size
from mlxqwen.errors import ConvertError

from .api import FORMATS, convert
from .batch import run_batch, summary_table
from .evaluate import evaluate_models
from .progress import make_progress


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "convert",
        help="convert a Hugging Face Qwen model (local or from the Hub) to MLX, quantized, or to GGUF",
        description="Convert a Hugging Face Qwen checkpoint into an MLX directory (mlx-lm's format) or a GGUF "
        "file, streaming tensor by tensor, or run a batch of conversions from a TOML manifest.",
    )
    p.add_argument(
        "source", nargs="?", help="local Hugging Face directory, local model name (mlxqwen list) or Hub repo id"
    )
    p.add_argument("-o", "--output", help="output path (default: NAME-RECIPE in the working directory)")
    p.add_argument("--to", choices=list(FORMATS), default="mlx", help="output format (default mlx)")
    p.add_argument("--revision", help="Hub branch, tag or commit (default: main)")
    p.add_argument("--force", action="store_true", help="replace an existing output")
    p.add_argument("--batch", metavar="FILE.toml", help="run the conversions listed in a TOML manifest")
    added = set()
    for fmt in FORMATS.values():
        group = p.add_argument_group(f"--to {fmt.name}")
        for name, spec in fmt.options.items():
            if name not in added:  # an option shared by several formats is one flag
                flag = f"--{name.replace('_', '-')}"
                group.add_argument(flag, dest=name, default=argparse.SUPPRESS, **spec.argparse_kwargs())
                added.add(name)
    p.set_defaults(func=run, format_options=added)

    e = subparsers.add_parser(
        "eval",
        help="compare a model with its source: KL divergence, top-1 agreement, perplexity",
        description="The conversion's quality report for any two models (MLX or Hugging Face directories, "
        "GGUF files, or names from mlxqwen list), on the report's held-out text or your own.",
    )
    e.add_argument("model", help="the model to measure (a conversion)")
    e.add_argument("--against", required=True, metavar="SRC", help="the reference (the source it was made from)")
    e.add_argument("--text", metavar="FILE", help="UTF-8 text to measure on (default: the report's built-in text)")
    e.set_defaults(func=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    with make_progress(console(stderr=True)) as progress:
        quality = evaluate_models(args.model, args.against, args.text, progress)
    console().print(f"{args.model} against {args.against}: {quality.summary()}")
    return 0


def run(args: argparse.Namespace) -> int:
    options = {k: v for k, v in vars(args).items() if k in args.format_options}
    if bool(args.batch) == bool(args.source):
        print("mlxqwen convert: error: give either SOURCE or --batch FILE.toml", file=sys.stderr)
        return 2
    out = console()
    try:
        if args.batch:
            if options or args.output or args.revision or args.force or args.to != "mlx":
                raise ConvertError(
                    "--batch: put options in the manifest's [defaults] or entries, not on the command line"
                )
            with make_progress(console(stderr=True)) as progress:
                outcomes = run_batch(Path(args.batch).expanduser(), progress)
            out.print(summary_table(outcomes))
            return 1 if any(o.status == "failed" for o in outcomes) else 0
        result = convert(args.source, args.output, to=args.to, revision=args.revision, force=args.force, **options)
    except KeyboardInterrupt:
        print("mlxqwen convert: interrupted; nothing half-written was kept", file=sys.stderr)
        return 130
    out.print(
        f"{result.output}: {result.recipe}, {format_size(result.size_bytes)}, "
        f"{result.bits_per_weight:.2f} bits/weight, {result.seconds:.1f} s"
    )
    if result.quality is not None:
        out.print(f"quality: {result.quality.summary()}")
    return 0
