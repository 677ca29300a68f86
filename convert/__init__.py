"""The converter: Hugging Face Qwen checkpoints to MLX (mlx-lm's format), quantized, streaming.

from mlxqwen.convert import convert
convert("Qwen/Qwen3.6-27B", "Qwen3.6-27B-4bit", recipe="4bit", eval=True)
"""

from .api import FORMATS, ConvertResult, convert
from .batch import run_batch
from .errors import ConvertError
from .quality import Quality
from .recipes import RECIPES

__all__ = ["FORMATS", "RECIPES", "ConvertError", "ConvertResult", "Quality", "convert", "run_batch"]
