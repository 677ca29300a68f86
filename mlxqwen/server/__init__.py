"""`mlxqwen serve`: the local server every client already speaks, Ollama's API (/api/*),
OpenAI's (/v1/chat/completions, /v1/completions, /v1/models) and Anthropic's (/v1/messages),
on Starlette and uvicorn.

`pool` holds the models; `generation` runs one request's `llm.stream(...)` for the event loop
(the engine batches concurrent streams and reuses cached prefixes); `ollama_api`,
`openai_api` and `anthropic_api` translate each dialect; `app` assembles them behind the
safety layers (API key, body limit, CORS, request log)."""

from .app import create_app, log_to_stderr
from .pool import ModelPool

__all__ = ["ModelPool", "create_app", "log_to_stderr"]
