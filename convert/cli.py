"""`mlxqwen convert SRC [-o OUT] [options]` and `mlxqwen convert --batch FILE.toml`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console

from mlxqwen.errors import ModelLoadError

from .api import FORMATS, convert, output_format
from .batch import run_batch, summary_table
from .errors import ConvertError
from .progress import make_progress


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "convert",
        help="convert a Hugging Face Qwen model (local or from the Hub) to MLX, quantized",
        description="Convert a Hugging Face Qwen checkpoint into an MLX directory (mlx-lm's format), "
        "streaming tensor by tensor, or run a batch of conversions from a TOML manifest.",
    )
    p.add_argument("source", nargs="?", help="local Hugging Face directory or Hub repo id (e.g. Qwen/Qwen3.6-27B)")
    p.add_argument("-o", "--output", help="output path (default: NAME-RECIPE in the working directory)")
    p.add_argument("--to", choices=list(FORMATS), default="mlx", help="output format (default mlx)")
    p.add_argument("--revision", help="Hub branch, tag or commit (default: main)")
    p.add_argument("--force", action="store_true", help="replace an existing output")
    p.add_argument("--batch", metavar="FILE.toml", help="run the conversions listed in a TOML manifest")
    added = set()
    for to in FORMATS:
        try:
            options = output_format(to).OPTIONS
        except ConvertError:  # its dependencies are missing: `--to` says so when it is asked for
            continue
        group = p.add_argument_group(f"--to {to}")
        for name, spec in options.items():
            if name not in added:  # an option shared by several formats is one flag
                spec = {k: v for k, v in spec.items() if k != "default"}
                group.add_argument(f"--{name.replace('_', '-')}", dest=name, default=argparse.SUPPRESS, **spec)
                added.add(name)
    p.set_defaults(func=run, format_options=added)


def run(args: argparse.Namespace) -> int:
    options = {k: v for k, v in vars(args).items() if k in args.format_options}
    if bool(args.batch) == bool(args.source):
        print("mlxqwen convert: error: give either SOURCE or --batch FILE.toml", file=sys.stderr)
        return 2
    console = Console()
    try:
        if args.batch:
            if options or args.output or args.revision or args.force or args.to != "mlx":
                raise ConvertError(
                    "--batch: put options in the manifest's [defaults] or entries, not on the command line"
                )
            with make_progress() as progress:
                outcomes = run_batch(Path(args.batch).expanduser(), progress)
            console.print(summary_table(outcomes))
            return 1 if any(o.status == "failed" for o in outcomes) else 0
        result = convert(args.source, args.output, to=args.to, revision=args.revision, force=args.force, **options)
    except (ConvertError, ModelLoadError) as e:
        print(f"mlxqwen convert: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("mlxqwen convert: interrupted; nothing half-written was kept", file=sys.stderr)
        return 130
    console.print(
        f"{result.output}: {result.recipe}, {result.size_bytes / 1e9:.2f} GB, "
        f"{result.bits_per_weight:.2f} bits/weight, {result.seconds:.1f} s"
    )
    if result.quality is not None:
        console.print(f"quality: {result.quality.summary()}")
    return 0
