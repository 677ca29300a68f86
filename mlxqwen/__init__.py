"""mlxqwen: fast local Qwen models on MLX."""

from .config import ModelConfig, parse_config
from .errors import ModelLoadError
from .generate import ContextLimitError, Done, GenerationOptions, PrefillProgress, Stats
from .llm import LLM, InsufficientMemoryError, load
from .parsing import TextDelta, ThinkingDelta, ToolCall
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
    "Stats",
    "TextDelta",
    "ThinkingDelta",
    "ToolCall",
    "load",
    "parse_config",
    "__version__",
]
