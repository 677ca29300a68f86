"""mlxqwen: fast local Qwen models on MLX."""

from .config import ModelConfig, parse_config
from .errors import ModelLoadError
from .llm import LLM, load

__version__ = "0.1.0"

__all__ = ["LLM", "ModelConfig", "ModelLoadError", "load", "parse_config", "__version__"]
