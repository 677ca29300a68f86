"""An HTTP error as the server reports it; each dialect writes it in its own error shape."""

from __future__ import annotations

import logging

from ..errors import ContextLimitError, InsufficientMemoryError, ModelLoadError, QueueFullError

RETRY_AFTER = 2  # seconds a client refused by a full queue is asked to wait

log = logging.getLogger("mlxqwen.server")


class APIError(Exception):
    """status: the HTTP status; kind: invalid_request, authentication, not_found, too_large,
    overloaded, insufficient_memory or server (each dialect names them its own way)."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request", headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        self.headers = headers or {}


def api_error(e: BaseException) -> APIError:
    """The HTTP error for an exception raised while serving a request."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, QueueFullError):
        return APIError(503, f"server busy: {e}", "overloaded", {"Retry-After": str(RETRY_AFTER)})
    if isinstance(e, InsufficientMemoryError):
        return APIError(507, str(e), "insufficient_memory")
    if isinstance(e, (ContextLimitError, ModelLoadError, ValueError)):
        return APIError(400, str(e))
    log.error("internal error", exc_info=e)
    return APIError(500, f"internal error: {type(e).__name__}: {e}", "server")
