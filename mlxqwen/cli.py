"""`mlxqwen` command line. Each subcommand lives in its own module, which defines
`register(subparsers)`. Only the module of the command being run is imported (all of
them for --help), so `mlxqwen chat` starts without loading the converter."""

from __future__ import annotations

import argparse
import importlib
import sys

# command -> module whose register(subparsers) adds it and sets `func` on its parser
COMMANDS: dict[str, str] = {
    "chat": "mlxqwen.tui.command",
    "generate": "mlxqwen.generate_cli",
    "fit": "mlxqwen.generate_cli",
    "convert": "mlxqwen.convert.cli",
    "pull": "mlxqwen.library_cli",
    "list": "mlxqwen.library_cli",
    "rm": "mlxqwen.library_cli",
    "serve": "mlxqwen.serve_cli",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="mlxqwen", description="Run Qwen models locally.")
    sub = parser.add_subparsers(dest="command", required=True)
    wanted = [COMMANDS[argv[0]]] if argv and argv[0] in COMMANDS else COMMANDS.values()
    for module in dict.fromkeys(wanted):
        importlib.import_module(module).register(sub)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
