"""mlxqwen: fast local Qwen models on MLX."""

from .backends import load
from .config import ModelConfig, parse_config
from .errors import ContextLimitError, InsufficientMemoryError, ModelLoadError, QueueFullError
from .events import Done, PrefillProgress, Stats, TextDelta, ThinkingDelta, ToolCall
from .llm import LLM
from .sampling import GenerationOptions
from .session import ChatSession

__version__ = "0.1.0"

__all__ = [
    "LLM",
    "ChatSession",
    "ContextLimitError",
    "Done",
    "GenerationOptions",
    "InsufficientMemoryError",
    "ModelConfig",
    "ModelLoadError",
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
