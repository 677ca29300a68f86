"""`mlxqwen` command line. Each subcommand lives in its own module, which defines
`register(subparsers)`; modules are imported only when listed here, so the CLI
starts fast."""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand modules, each with register(subparsers) that sets `func` on its parser
COMMANDS: list[str] = ["mlxqwen.convert.cli", "mlxqwen.generate_cli"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mlxqwen", description="Run Qwen models locally.")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMANDS:
        importlib.import_module(module).register(sub)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
