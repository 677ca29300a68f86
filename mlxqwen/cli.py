"""`mlxqwen` command line. Each subcommand lives in its own module, which defines
`register(subparsers)`. Only the module of the command being run is imported (all of
them for --help), so `mlxqwen chat` starts without loading the converter.

Every command reports the same way: an error is one line on stderr, `mlxqwen COMMAND: error:
MESSAGE` (as argparse writes its own), with exit status 1; a note is `mlxqwen COMMAND: note:
MESSAGE` (a warning: `warning:`). Messages name options as flags (`--force`, see
`mlxqwen.errors.option`). Output to a pipe or a file is never wrapped."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys

from rich.console import Console

from .errors import command_line_wording

# command -> module whose register(subparsers) adds it and sets `func` on its parser
COMMANDS: dict[str, str] = {
    "chat": "mlxqwen.tui.command",
    "generate": "mlxqwen.generate_cli",
    "fit": "mlxqwen.generate_cli",
    "convert": "mlxqwen.convert.cli",
    "eval": "mlxqwen.convert.cli",
    "pull": "mlxqwen.library_cli",
    "list": "mlxqwen.library_cli",
    "rm": "mlxqwen.library_cli",
    "serve": "mlxqwen.serve_cli",
}


def error(command: str, message: object) -> int:
    """Report an error of `mlxqwen COMMAND`; returns the exit status, 1."""
    print(f"mlxqwen {command}: error: {message}", file=sys.stderr, flush=True)
    return 1


def note(command: str, message: object, kind: str = "note") -> None:
    """Report a note (advice) of `mlxqwen COMMAND`, or with kind="warning" a risk the user takes."""
    print(f"mlxqwen {command}: {kind}: {message}", file=sys.stderr, flush=True)


def console(stderr: bool = False) -> Console:
    """A rich console that wraps lines on a terminal only (piped or redirected, every line stays
    whole whatever its length) and prints text as it is: `[llama]` is no markup."""
    out = Console(stderr=stderr, soft_wrap=True, markup=False, highlight=False)
    if not out.is_terminal:
        out.width = 1_000_000
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="mlxqwen", description="Run Qwen models locally.")
    sub = parser.add_subparsers(dest="command", required=True)
    wanted = [COMMANDS[argv[0]]] if argv and argv[0] in COMMANDS else COMMANDS.values()
    for module in dict.fromkeys(wanted):
        importlib.import_module(module).register(sub)
    args = parser.parse_args(argv)
    quiet = contextlib.nullcontext()
    if "MLX_RANK" in os.environ:  # one of the processes mlx.launch started (see mlxqwen.distributed)
        from .distributed import quiet_followers, report_follower_failure

        quiet = quiet_followers()
    with command_line_wording():
        with quiet as held:
            try:
                status = int(args.func(args) or 0)
            except (ValueError, OSError) as e:  # mlxqwen's errors are ValueErrors with a one-line message
                status = error(args.command, e)
            except KeyboardInterrupt:
                return 130
        if status and held is not None:
            report_follower_failure(held)
        return status


if __name__ == "__main__":
    sys.exit(main())
