"""`mlxqwen chat [MODEL]`: the terminal chat app."""

from __future__ import annotations

import argparse
import functools
import os
import sys

from mlxqwen.generate_cli import add_context_options, load_options


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "chat",
        help="chat with a model in the terminal",
        description="Chat with a local model. Without MODEL, opens the last model used, else the newest in the "
        "library, else the newest Qwen model in the Hugging Face cache, else the built-in demo model.",
    )
    p.add_argument("model", nargs="?", help="a model directory or .gguf file, or a name from mlxqwen list")
    p.add_argument("-c", "--continue", dest="resume", action="store_true", help="reopen the most recent chat")
    add_context_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import mlxqwen
    from mlxqwen.library import resolve_model

    from .app import ChatApp

    model = resolve_model(args.model) if args.model else None  # an unknown name: one line, before the window
    app = ChatApp(model, resume=args.resume, loader=functools.partial(mlxqwen.load, **load_options(args)))
    app.run()
    code = app.return_code or 0
    if not app.engine_stopped:
        # the model is still loading: leave without waiting for it (chats are saved already)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code
