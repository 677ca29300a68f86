"""`mlxqwen serve [MODEL ...]`: the Ollama, OpenAI and Anthropic APIs on a local port (see
`mlxqwen.server`)."""

from __future__ import annotations

import argparse
import errno
import functools
import ipaddress
import os
import socket
import sys
from pathlib import Path

from . import distributed
from .cli import error, note
from .generate_cli import add_context_options, load_options, number_arg

API_KEY_ENV = "MLXQWEN_API_KEY"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve models over HTTP (Ollama, OpenAI and Anthropic APIs)",
        description="Serve local models over HTTP with Ollama's API (/api/*), OpenAI's (/v1/chat/completions, "
        "/v1/completions, /v1/models) and Anthropic's (/v1/messages). Without MODEL it serves every model "
        "mlxqwen list shows, each loaded on first use.",
    )
    p.add_argument("models", nargs="*", metavar="MODEL", help="a name from mlxqwen list, or a model's path")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=number_arg(int, 0, "0 or more"), default=11434, help="port (default 11434, Ollama's)")
    p.add_argument("--api-key", default=os.environ.get(API_KEY_ENV), help=f"require this key (or ${API_KEY_ENV})")
    p.add_argument("--max-concurrent", type=number_arg(int, 1, "at least 1"),
                   help="sequences generated together per model (default 8)")  # fmt: skip
    p.add_argument("--max-queue", type=number_arg(int, 0, "0 or more"),
                   help="requests that may wait per model before a 503 (default 64)")  # fmt: skip
    p.add_argument("--keep-alive", default="5m", help="how long an idle model stays loaded (default 5m; -1: always)")
    p.add_argument("--cors-origin", action="append", default=[], help="allow this web origin besides localhost's")
    p.add_argument("--max-body-mb", type=number_arg(float, 0, "above 0", above=True), default=16,
                   help="largest request body in MiB (default 16)")  # fmt: skip
    add_context_options(p)
    p.set_defaults(func=run)


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket, or OSError (EADDRINUSE when the port is taken)."""
    family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    return socket.create_server(address[:2], family=family)


def _loopback(host: str) -> bool:
    try:
        return all(ipaddress.ip_address(info[4][0]).is_loopback for info in socket.getaddrinfo(host, None))
    except (OSError, ValueError):
        return False


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from . import load
    from .library import find_model, model_at
    from .server import ModelPool, create_app, log_to_stderr
    from .server.errors import APIError
    from .server.requests import duration

    try:
        keep_alive = duration(args.keep_alive, None, "--keep-alive")
    except APIError as e:
        return error("serve", e)
    models = [model_at(Path(m)) if Path(m).expanduser().exists() else find_model(m) for m in args.models]
    engine = {
        k: v for k, v in (("max_concurrent", args.max_concurrent), ("max_queue", args.max_queue)) if v is not None
    }
    loader = functools.partial(load, **load_options(args), **engine)
    split = distributed.group() is not None  # one of the processes of mlx.launch
    if split:
        if len(models) != 1:
            return error("serve", "under mlx.launch, serve one MODEL: every process loads its part of it")
        if distributed.rank() > 0:
            loader(models[0].path)  # makes rank 0's calls on this process's part, then ends the process
        keep_alive = None

    log_to_stderr()
    try:
        sock = _listen(args.host, args.port)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            return error(
                "serve",
                f"port {args.port} on {args.host} is taken (Ollama or another server?); choose one with --port N",
            )
        return error("serve", f"cannot listen on {args.host}:{args.port} ({e.strerror or e})")
    if not _loopback(args.host) and not args.api_key:
        note(
            "serve",
            f"listening on {args.host} without --api-key: anyone who can reach this machine can use its models",
            "warning",
        )

    pool = (_kept(ModelPool) if split else ModelPool)(models or None, keep_alive=keep_alive, load=loader)
    app = create_app(
        pool,
        api_key=args.api_key,
        cors_origins=args.cors_origin,
        max_body=int(args.max_body_mb * 2**20),
        preload=[m.name for m in models],
    )
    served = ", ".join(m.name for m in models) if models else "every model mlxqwen list shows"
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"mlxqwen serve: http://{host}:{args.port} serving {served}", file=sys.stderr, flush=True)
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])
    return 0


def _kept(pool: type) -> type:
    class Kept(pool):
        """The model split across mlx.launch's processes stays loaded: the others end with it."""

        def unload(self, name: str) -> bool:
            return False

    return Kept
