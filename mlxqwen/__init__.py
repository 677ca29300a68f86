"""mlxqwen: fast local Qwen models on MLX."""

from .backends import load
from .backends.mlx import LLM
from .config import ModelConfig, parse_config
from .engine import GenerationOptions
from .errors import ContextLimitError, InsufficientMemoryError, ModelLoadError
from .events import Done, PrefillProgress, Stats, TextDelta, ThinkingDelta, ToolCall
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
