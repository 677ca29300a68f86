"""mlxqwen: Qwen models on your own machine, MLX on Apple Silicon and llama.cpp elsewhere."""

import logging

from .backends import load
from .config import ModelConfig, parse_config
from .errors import (
    ContextLimitError,
    ConvertError,
    InsufficientMemoryError,
    ModelLoadError,
    ModelNotFoundError,
    QueueFullError,
)
from .events import Done, PrefillProgress, Stats, TextDelta, ThinkingDelta, ToolCall
from .llm import LLM
from .sampling import GenerationOptions
from .session import ChatSession

__version__ = "0.1.0"

# The library's log (notes such as "this model would run faster on llama.cpp") prints nothing
# unless the application configures logging.
logging.getLogger("mlxqwen").addHandler(logging.NullHandler())

__all__ = [
    "LLM",
    "ChatSession",
    "ContextLimitError",
    "ConvertError",
    "Done",
    "GenerationOptions",
    "InsufficientMemoryError",
    "ModelConfig",
    "ModelLoadError",
    "ModelNotFoundError",
    "PrefillProgress",
    "QueueFullError",
    "Stats",
    "TextDelta",
    "ThinkingDelta",
    "ToolCall",
    "load",
    "parse_config",
    "__version__",
]
